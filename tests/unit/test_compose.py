"""Static checks of docker-compose.yml, the Dockerfile and the Prometheus config.

Docker is not needed: the compose file is parsed with PyYAML and checked against what the
services need from each other (listeners, ports, health checks, settings). ``${VAR:-default}``
interpolation is resolved the way ``docker compose`` does with an empty environment, so the
checks are about the defaults a plain ``docker compose up`` uses; a variable without a default
is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import SecretStr

from stream.settings import ENV_PREFIX, Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

SERVICES = ("kafka", "redis", "worker", "prometheus", "grafana")
IMAGE_REPOSITORIES = {
    "kafka": "apache/kafka",
    "redis": "redis",
    "prometheus": "prom/prometheus",
    "grafana": "grafana/grafana",
}
# service -> the port published on the host, equal to the port inside the container
PUBLISHED = {"kafka": 29092, "redis": 6379, "worker": 6066, "prometheus": 9090, "grafana": 3000}
REQUIRED_WORKER_ENV = ("KAFKA_BOOTSTRAP", "REDIS_URL", "WEB_PORT")
HEALTHCHECKED = ("kafka", "redis", "worker")

PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
PROMETHEUS_RULES = "/etc/prometheus/alerts.yml"
# Mounted from the repository but written later: their mounts are checked, not their existence.
NOT_YET_WRITTEN: set[Path] = set()


# -- compose parsing helpers -----------------------------------------------------------

_VAR_RE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^${}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def _interpolate_str(value: str, where: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op = m.group("op")
        if op in ("-", ":-"):
            return m.group("arg")
        if op in ("+", ":+"):
            return ""
        raise AssertionError(
            f"{where}: ${{{name}}} has no default, so a plain `docker compose up` "
            f"leaves it empty or fails ({value!r})"
        )

    out = _VAR_RE.sub(repl, value)
    leftover = _VAR_RE.sub("", value.replace("$$", ""))
    assert "${" not in leftover, f"{where}: unsupported interpolation in {value!r}"
    return out


def _interpolate(node: Any, where: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        return _interpolate_str(node, where)
    return node


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings; variables passed through from the host are left out."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) if "=" in item else [item, None] for item in env]
        env = dict(pairs)
    return {str(k): _scalar(v) for k, v in env.items() if v is not None}


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) pairs a service publishes."""
    pairs: set[tuple[int, int]] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published") is not None:
                pairs.add((int(entry["published"]), int(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 1:
            continue  # container port only: the host port is ephemeral
        assert "-" not in parts[-1] and "-" not in parts[-2], f"port range in {entry!r}"
        pairs.add((int(parts[-2]), int(parts[-1])))
    return pairs


def network_names(compose: dict[str, Any], name: str) -> set[str]:
    """Names that resolve to a service on the compose network."""
    service = compose["services"][name]
    names = {name}
    for key in ("hostname", "container_name"):
        if service.get(key):
            names.add(service[key])
    networks = service.get("networks")
    if isinstance(networks, dict):
        for cfg in networks.values():
            names.update((cfg or {}).get("aliases") or [])
    return names


def healthcheck_command(service: dict[str, Any]) -> list[str]:
    """The arguments of a service's health check; fails when there is none."""
    hc = service.get("healthcheck")
    assert isinstance(hc, dict), "no healthcheck"
    assert not hc.get("disable"), "healthcheck disabled"
    test = hc.get("test")
    if isinstance(test, str):
        assert test.strip(), "empty healthcheck test"
        return ["CMD-SHELL", test]
    assert isinstance(test, list) and len(test) >= 2, f"healthcheck test {test!r}"
    assert test[0] in ("CMD", "CMD-SHELL"), f"healthcheck test {test!r}"
    assert all(str(a).strip() for a in test[1:]), f"healthcheck test {test!r}"
    return [str(a) for a in test]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition (the short list form means ``service_started``)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (cfg or {}).get("condition", "service_started") for d, cfg in deps.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, container path) of each mount."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.append((v.get("type", "volume"), str(v.get("source", "")), str(v["target"])))
            continue
        parts = str(v).split(":")
        if len(parts) == 1:
            out.append(("volume", "", parts[0]))  # anonymous volume
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append((kind, source, target))
    return out


def repo_binds(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount from the repository."""
    return [
        ((REPO_ROOT / src).resolve() if not src.startswith("/") else Path(src), dst)
        for kind, src, dst in _mounts(service)
        if kind == "bind"
    ]


def host_path_for(service: dict[str, Any], container_path: str) -> Path | None:
    """The host file a container path comes from (the most specific mount wins), if a bind."""
    target = PurePosixPath(container_path)
    best: tuple[int, str, str, str] | None = None
    for kind, src, dst in _mounts(service):
        d = PurePosixPath(dst)
        covers = target == d or d in target.parents
        if covers and (best is None or len(d.parts) > best[0]):
            best = (len(d.parts), kind, src, dst)
    if best is None or best[1] != "bind":
        return None
    _, _, src, dst = best
    rel = target.relative_to(PurePosixPath(dst))
    base = Path(src) if src.startswith("/") else (REPO_ROOT / src)
    return (base / rel).resolve()


def parse_listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, address = item.partition("://")
        assert sep, f"listener {item!r} is not NAME://host:port"
        host, _, port = address.rpartition(":")
        out[name] = (host.strip("[]"), int(port))
    return out


def _duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+)(ms|s|m|h|d)", value):
        assert m.start() == pos, f"bad duration {value!r}"
        total += int(m.group(1)) * units[m.group(2)]
        pos = m.end()
    assert pos == len(value) and pos, f"bad duration {value!r}"
    return total


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    return _interpolate(raw_compose)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict), "no services"
    missing = [s for s in SERVICES if s not in svcs]
    assert not missing, f"missing services: {missing}"
    return svcs


@pytest.fixture(scope="module")
def worker_env(services: dict[str, Any]) -> dict[str, str]:
    return environment(services["worker"])


@pytest.fixture(scope="module")
def kafka_env(services: dict[str, Any]) -> dict[str, str]:
    return environment(services["kafka"])


# -- the compose file ---------------------------------------------------------------------


def test_compose_spec_without_version_key(raw_compose: dict[str, Any]) -> None:
    assert "version" not in raw_compose, "the Compose spec has no top-level `version:`"


def test_five_services_exist(services: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(services)


@pytest.mark.parametrize("name", SERVICES)
def test_images_pinned(services: dict[str, Any], name: str) -> None:
    service = services[name]
    image = service.get("image")
    if name in IMAGE_REPOSITORIES:
        assert image, f"{name} has no image"
    if image is None:
        assert service.get("build"), f"{name} has neither image nor build"
        return
    if "@sha256:" in image:
        return  # pinned by digest
    last = image.rsplit("/", 1)[-1]
    assert ":" in last, f"{name}: image {image!r} has no tag"
    repository = image[: -len(last)] + last.split(":", 1)[0]
    tag = last.split(":", 1)[1]
    assert tag and tag != "latest", f"{name}: image {image!r} is not pinned"
    if name in IMAGE_REPOSITORIES:
        assert repository == IMAGE_REPOSITORIES[name], f"{name}: image {image!r}"


@pytest.mark.parametrize("name", SERVICES)
def test_ports_published(services: dict[str, Any], name: str) -> None:
    port = PUBLISHED[name]
    assert (port, port) in published_ports(services[name]), (
        f"{name} should publish {port}:{port}, has {services[name].get('ports')!r}"
    )


def test_worker_publishes_its_web_port(
    services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    web_port = int(worker_env[f"{ENV_PREFIX}WEB_PORT"])
    assert any(t == web_port for _, t in published_ports(services["worker"]))


def test_named_volumes_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set((compose.get("volumes") or {}).keys())
    for name in ("kafka", "redis"):
        named = [src for kind, src, _ in _mounts(services[name]) if kind == "volume" and src]
        assert named, f"{name} keeps its data in no named volume"
    for name, service in services.items():
        for kind, src, _ in _mounts(service):
            if kind == "volume" and src:
                assert src in declared, f"{name} uses undeclared volume {src!r}"


# -- health checks and start order ----------------------------------------------------------


@pytest.mark.parametrize("name", HEALTHCHECKED)
def test_healthcheck_present(services: dict[str, Any], name: str) -> None:
    healthcheck_command(services[name])


def test_kafka_healthcheck_queries_a_bound_listener(
    services: dict[str, Any], kafka_env: dict[str, str]
) -> None:
    cmd = " ".join(healthcheck_command(services["kafka"])[1:])
    assert re.search(r"kafka-(broker-api-versions|topics)\.sh", cmd), cmd
    assert "--bootstrap-server" in cmd, cmd
    m = re.search(r"--bootstrap-server[ =](localhost|127\.0\.0\.1):(\d+)", cmd)
    assert m, f"healthcheck does not query the broker on localhost: {cmd}"
    controllers = set(kafka_env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "").split(","))
    bound = {
        port for lname, (_, port) in parse_listeners(kafka_env["KAFKA_LISTENERS"]).items()
        if lname not in controllers
    }
    assert int(m.group(2)) in bound, f"port {m.group(2)} is not a broker listener ({bound})"


def test_redis_healthcheck_pings(services: dict[str, Any]) -> None:
    cmd = " ".join(healthcheck_command(services["redis"])[1:])
    assert re.search(r"redis-cli\b.*\bping\b", cmd, re.IGNORECASE), cmd


def test_worker_healthcheck_hits_healthz(
    services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    test = healthcheck_command(services["worker"])
    web_port = int(worker_env[f"{ENV_PREFIX}WEB_PORT"])
    joined = " ".join(test[1:])
    assert re.search(rf"//(localhost|127\.0\.0\.1):{web_port}/healthz\b", joined), joined
    assert "curl" not in joined and "wget" not in joined, "python:3.11-slim has neither"
    if test[0] == "CMD" and test[1].startswith("python") and "-c" in test:
        code = test[test.index("-c") + 1]
        compile(code, "<healthcheck>", "exec")


def test_worker_waits_for_healthy_kafka_and_redis(services: dict[str, Any]) -> None:
    deps = depends_on(services["worker"])
    for dep in ("kafka", "redis"):
        assert deps.get(dep) == "service_healthy", f"worker depends_on {dep}: {deps.get(dep)}"


def test_prometheus_depends_on_worker(services: dict[str, Any]) -> None:
    assert "worker" in depends_on(services["prometheus"])


# -- kafka ---------------------------------------------------------------------------------


def test_kafka_single_node_kraft(kafka_env: dict[str, str]) -> None:
    roles = {r.strip() for r in kafka_env.get("KAFKA_PROCESS_ROLES", "").split(",")}
    assert roles == {"broker", "controller"}
    node_id = kafka_env.get("KAFKA_NODE_ID")
    assert node_id and node_id.isdigit()
    listeners = parse_listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = parse_listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(
        p.split(":", 1) for p in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    controllers = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    for name in controllers:
        assert name in listeners and name not in advertised
    assert set(listeners) <= set(protocols) and set(advertised) <= set(listeners)
    assert kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    voters = kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1
    voter_id, _, voter_addr = voters[0].partition("@")
    assert voter_id == node_id
    assert int(voter_addr.rpartition(":")[2]) == listeners[controllers[0]][1]
    assert kafka_env.get("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR") == "1"
    assert kafka_env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "").lower() == "false"


def test_kafka_host_listeners_are_published(
    services: dict[str, Any], kafka_env: dict[str, str]
) -> None:
    listeners = parse_listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = parse_listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    ports = published_ports(services["kafka"])
    host_side = {n: hp for n, hp in advertised.items() if hp[0] in ("localhost", "127.0.0.1")}
    assert host_side, "no listener is advertised for clients on the host"
    for name, (_, port) in host_side.items():
        assert (port, listeners[name][1]) in ports, (
            f"{name} is advertised as localhost:{port} but host port {port} is not "
            f"published to container port {listeners[name][1]}"
        )


def test_worker_bootstrap_matches_an_advertised_listener(
    compose: dict[str, Any], worker_env: dict[str, str], kafka_env: dict[str, str]
) -> None:
    listeners = parse_listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = parse_listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(
        p.split(":", 1) for p in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    kafka_names = network_names(compose, "kafka")
    protocol = worker_env.get(
        f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL",
        Settings.model_fields["kafka_security_protocol"].default,
    )
    for part in worker_env[f"{ENV_PREFIX}KAFKA_BOOTSTRAP"].split(","):
        host, _, port_s = part.strip().rpartition(":")
        assert host in kafka_names, f"{host!r} is not the kafka service on the network"
        matches = [n for n, hp in advertised.items() if hp == (host, int(port_s))]
        assert matches, f"kafka advertises no listener {host}:{port_s} ({advertised})"
        name = matches[0]
        assert listeners[name][1] == int(port_s), f"{name} is not bound on {port_s} in kafka"
        assert protocols[name] == protocol, f"{name} speaks {protocols[name]}, worker {protocol}"


# -- worker settings ---------------------------------------------------------------------------


def test_worker_env_keys_are_settings_fields(worker_env: dict[str, str]) -> None:
    keys = [k for k in worker_env if k.startswith(ENV_PREFIX)]
    assert keys
    unknown = [k for k in keys if k[len(ENV_PREFIX):].lower() not in Settings.model_fields]
    assert not unknown, f"not settings fields: {unknown}"
    missing = [f for f in REQUIRED_WORKER_ENV if f"{ENV_PREFIX}{f}" not in worker_env]
    assert not missing, f"worker environment lacks {missing}"


def test_worker_redis_url_points_at_redis_service(
    compose: dict[str, Any], services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    url = urlparse(worker_env[f"{ENV_PREFIX}REDIS_URL"])
    assert url.scheme == "redis"
    assert url.hostname in network_names(compose, "redis"), url.hostname
    command = services["redis"].get("command") or []
    command = command.split() if isinstance(command, str) else [str(c) for c in command]
    redis_port = int(command[command.index("--port") + 1]) if "--port" in command else 6379
    assert (url.port or 6379) == redis_port
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    # the append-only file is rewritten as rarely as by the local Redis of `segstream up`
    from stream.services import REDIS_AOF_REWRITE_PERCENTAGE

    at = command.index("--auto-aof-rewrite-percentage")
    assert int(command[at + 1]) == REDIS_AOF_REWRITE_PERCENTAGE


def test_worker_environment_builds_settings(
    monkeypatch: pytest.MonkeyPatch, worker_env: dict[str, str]
) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    for key, raw in worker_env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        value = getattr(settings, key[len(ENV_PREFIX):].lower())
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value == type(value)(raw), key
        else:
            assert str(value) == raw, key


# -- prometheus, mounts and the image -----------------------------------------------------------


def _prometheus_config_path(service: dict[str, Any]) -> str:
    command = service.get("command") or []
    command = command.split() if isinstance(command, str) else command
    for arg in command:
        if str(arg).startswith("--config.file="):
            return str(arg).split("=", 1)[1]
    return PROMETHEUS_CONFIG


def test_prometheus_config_scrapes_worker(
    services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    prometheus = services["prometheus"]
    path = host_path_for(prometheus, _prometheus_config_path(prometheus))
    assert path is not None, "the Prometheus config is not mounted from the repository"
    assert path == REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml", path
    assert path.is_file(), f"{path} does not exist"
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)

    assert PROMETHEUS_RULES in (config.get("rule_files") or [])
    assert host_path_for(prometheus, PROMETHEUS_RULES) == (
        REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
    ), "alerts.yml is not mounted at the rule file path"

    target = f"worker:{worker_env[f'{ENV_PREFIX}WEB_PORT']}"
    global_cfg = config.get("global") or {}
    jobs = [
        job for job in config.get("scrape_configs") or []
        if any(target in (sc.get("targets") or []) for sc in job.get("static_configs") or [])
    ]
    assert jobs, f"no scrape job targets {target}"
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"
    interval = _duration_s(job.get("scrape_interval") or global_cfg.get("scrape_interval", "1m"))
    assert interval == 5, f"worker scraped every {interval}s"
    timeout = job.get("scrape_timeout") or global_cfg.get("scrape_timeout")
    if timeout is not None:
        assert _duration_s(timeout) <= interval, "scrape_timeout exceeds scrape_interval"


def test_grafana_mounts(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    prov = host_path_for(grafana, "/etc/grafana/provisioning")
    dash = host_path_for(grafana, "/var/lib/grafana/dashboards")
    assert prov == REPO_ROOT / "deploy" / "grafana" / "provisioning"
    assert dash == REPO_ROOT / "deploy" / "grafana" / "dashboards"
    env = environment(grafana)
    assert env.get("GF_SECURITY_ADMIN_PASSWORD"), "no admin password default"


def test_mounted_repo_files_exist(services: dict[str, Any]) -> None:
    missing = []
    for name, service in services.items():
        for host, _ in repo_binds(service):
            if host in NOT_YET_WRITTEN:
                continue  # written later; its mount is checked above
            if REPO_ROOT in host.parents and not host.exists():
                missing.append(f"{name}: {host.relative_to(REPO_ROOT)}")
    assert not missing, f"mounted from the repository but missing: {missing}"


def _dockerfile(services: dict[str, Any]) -> Path:
    build = services["worker"].get("build")
    assert build, "worker is not built from the repository"
    if isinstance(build, str):
        build = {"context": build}
    context = (REPO_ROOT / build.get("context", ".")).resolve()
    return context / build.get("dockerfile", "Dockerfile")


def test_worker_dockerfile(services: dict[str, Any], worker_env: dict[str, str]) -> None:
    dockerfile = _dockerfile(services)
    assert dockerfile.is_file(), f"{dockerfile} does not exist"
    lines = [
        ln.strip() for ln in dockerfile.read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert froms and froms[-1] == "python:3.11-slim", froms
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    exposed = {p.split("/")[0] for ln in lines if ln.upper().startswith("EXPOSE ")
               for p in ln.split()[1:]}
    assert worker_env[f"{ENV_PREFIX}WEB_PORT"] in exposed
    assert any(re.match(r"RUN .*pip install .*--no-cache-dir", ln) for ln in lines)
    cmd = services["worker"].get("command")
    if cmd is None:
        cmd = [ln for ln in lines if ln.upper().startswith("CMD ")][-1]
    joined = cmd if isinstance(cmd, str) else " ".join(cmd)
    assert re.search(r"segstream\W+worker", joined), joined


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(
    services: dict[str, Any],
) -> None:
    grafana = services["grafana"]
    prov = host_path_for(grafana, "/etc/grafana/provisioning")
    assert prov is not None
    datasources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    url = urlparse(datasources["datasources"][0]["url"])
    assert url.hostname == "prometheus" and url.port == PUBLISHED["prometheus"]
    providers = yaml.safe_load((prov / "dashboards" / "segstream.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    dashboards = host_path_for(grafana, path)
    assert dashboards is not None and any(dashboards.glob("*.json")), path
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        home_file = host_path_for(grafana, home)
        assert home_file is not None and home_file.is_file(), home
