"""The Kubernetes manifests in deploy/k8s: valid objects that would actually run the engine.

No cluster is needed. The kustomization is rendered in Python (the subset of kustomize it uses;
when ``kubectl`` is installed the rendering is compared with ``kubectl kustomize``), every core
object is validated against the Kubernetes OpenAPI schemas bundled with ``kubernetes-validate``
(strict: unknown fields are errors, as with ``kubectl apply``), and the KEDA objects against the
openAPIV3Schema of KEDA's CRDs vendored in deploy/k8s/schemas. Then the properties a schema
cannot see: the environment builds a valid :class:`stream.settings.Settings`, the probes hit
routes the worker serves on the port it listens on, the ScaledObject watches the workers' own
consumer group and topics and stops at the partition count, the rules ConfigMap is the repo's
catalogue and passes ``segstream rules validate``, and the resources fit the measured worker.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr
from typer.testing import CliRunner

from stream.metrics import EngineMetrics
from stream.settings import ENV_PREFIX, Settings, load_settings
from stream.web import add_routes

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
SECRET_TEMPLATE = K8S / "secret.example.yaml"
KEDA_API = "keda.sh/v1alpha1"
KEDA_CRDS = {
    "ScaledObject": SCHEMAS / "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": SCHEMAS / "keda.sh_triggerauthentications.yaml",
}
# The oldest Kubernetes release the manifests are meant for, and the newest the validator knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator",
                      "images"}
# Kafka security settings of the engine -> the KEDA kafka scaler's metadata.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256",
             "SCRAM-SHA-512": "scram_sha512"}
KEDA_TLS = {"PLAINTEXT": "disable", "SASL_PLAINTEXT": "disable", "SSL": "enable",
            "SASL_SSL": "enable"}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


# -- rendering -----------------------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(root: Path = K8S) -> list[dict[str, Any]]:
    """``kustomize build root`` for the features deploy/k8s uses (others fail loudly)."""
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_KEYS
    assert not unknown, f"kustomization uses {unknown}, which this renderer does not implement"
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = root / res
        assert path.is_file(), f"resource {res} is not a file in {root}"
        docs.extend(_load_all(path))
    for gen in kust.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files", "options"}, gen
        opts = gen.get("options") or {}
        # Without this, kustomize appends a content hash to the name and rewrites references.
        assert opts.get("disableNameSuffixHash") is True, gen["name"]
        data = {}
        for entry in gen.get("files", []):
            key, _, rel = entry.rpartition("=")
            rel_path = root / rel
            assert rel_path.resolve().is_relative_to(root.resolve()), (
                f"{rel} is outside the kustomization root; kustomize refuses to load it")
            data[key or rel_path.name] = rel_path.read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"]}, "data": data})
    ns = kust.get("namespace")
    for doc in docs:
        if ns and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = ns
        for container in _containers(doc):
            for img in kust.get("images", []):
                name, _, tag = container["image"].partition(":")
                if name == img["name"]:
                    new_tag = str(img.get("newTag", tag))
                    container["image"] = img.get("newName", name) + (f":{new_tag}"
                                                                     if new_tag else "")
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind} named {name!r} in the manifests"
    return found[0]


def quantity(value: str | int | float) -> float:
    m = _QUANTITY.match(str(value))
    assert m, f"unsupported quantity {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def secret() -> dict[str, Any]:
    (doc,) = _load_all(SECRET_TEMPLATE)
    return doc


@pytest.fixture(scope="module")
def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "Deployment")


@pytest.fixture(scope="module")
def worker(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def pod_env(docs: list[dict[str, Any]], container: dict[str, Any],
            secret: dict[str, Any]) -> dict[str, str]:
    """The environment the container starts with (Secret values from the template)."""
    env: dict[str, str] = {}
    secret_data = secret.get("stringData") or {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unsupported envFrom {source}"
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            sk = ref["secretKeyRef"]
            assert sk["name"] == secret["metadata"]["name"], f"{var['name']}: {sk['name']}"
            assert sk["key"] in secret_data, f"{var['name']}: no key {sk['key']} in the Secret"
            env[var["name"]] = secret_data[sk["key"]]
        elif "configMapKeyRef" in ref:
            cm = ref["configMapKeyRef"]
            env[var["name"]] = named(docs, "ConfigMap", cm["name"])["data"][cm["key"]]
        else:
            raise AssertionError(f"{var['name']}: unsupported valueFrom {ref}")
    return env


@pytest.fixture(scope="module")
def env(docs: list[dict[str, Any]], worker: dict[str, Any],
        secret: dict[str, Any]) -> dict[str, str]:
    return pod_env(docs, worker, secret)


def mounted_files(docs: list[dict[str, Any]], deployment: dict[str, Any],
                  worker: dict[str, Any], into: Path) -> dict[str, Path]:
    """Lay out the container's volume mounts under ``into``: mount path -> local directory."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts: dict[str, Path] = {}
    for i, m in enumerate(worker.get("volumeMounts", [])):
        assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
        local = into / f"mount{i}"
        local.mkdir()
        vol = volumes[m["name"]]
        if "configMap" in vol:
            data = named(docs, "ConfigMap", vol["configMap"]["name"])["data"]
            for item in vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                (local / item["path"]).write_text(data[item["key"]])
        mounts[m["mountPath"]] = local
    return mounts


def localize(value: str, mounts: dict[str, Path]) -> str:
    """A container path as the local path of the mount holding it (others unchanged)."""
    if not value.startswith("/"):
        return value
    p = PurePosixPath(value)
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        mp = PurePosixPath(mount)
        if p == mp or mp in p.parents:
            return str(local / p.relative_to(mp))
    return value


@pytest.fixture
def pod_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, docs: list[dict[str, Any]],
                 deployment: dict[str, Any], worker: dict[str, Any],
                 env: dict[str, str]) -> Iterator[tuple[Settings, dict[str, Path]]]:
    """The worker's settings as the pod builds them, with its mounts laid out in tmp_path."""
    mounts = mounted_files(docs, deployment, worker, tmp_path)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, localize(value, mounts))
    yield load_settings(), mounts


@pytest.fixture(scope="module")
def settings(env: dict[str, str]) -> Settings:
    """Settings from the pod's environment, without the rules files (their paths are the pod's;
    ``pod_settings`` checks those)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                mp.delenv(key)
        for key, value in env.items():
            if key not in (f"{ENV_PREFIX}RULES_PATH", f"{ENV_PREFIX}ACTIONS_PATH"):
                mp.setenv(key, value)
        return load_settings()


# -- rendering and schemas -------------------------------------------------------------------


def test_renders_the_expected_objects(docs: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "ConfigMap", "Deployment", "Service",
                            "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication"])
    assert len({_key(d) for d in docs}) == len(docs), "duplicate objects"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_python_rendering_equals_kubectl_kustomize(docs: list[dict[str, Any]]) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    theirs = {_key(d): d for d in yaml.safe_load_all(out) if d}
    ours = {_key(d): d for d in docs}
    assert theirs == ours


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_match_the_kubernetes_schema(docs: list[dict[str, Any]],
                                                  secret: dict[str, Any], version: str) -> None:
    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")] + [secret]
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.caught.absolute_path)
            pytest.fail(f"{_key(doc)} against Kubernetes {version}: {path}: {exc.caught.message}")


def test_kubernetes_schema_rejects_what_the_api_server_would(
    deployment: dict[str, Any],
) -> None:
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    bad_port = copy.deepcopy(deployment)
    bad_port["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for doc in (typo, bad_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def structural_to_jsonschema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as a JSON schema that, like the API server with strict field
    validation (kubectl's default), rejects fields the schema does not declare."""
    if isinstance(node, list):
        return [structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: structural_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-")}
    if node.get("type") == "object" and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields") and "properties" in node:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    (crd,) = _load_all(KEDA_CRDS[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == KEDA_API.split("/")[1]]
    schema = structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema,
                                           format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("kind", sorted(KEDA_CRDS))
def test_vendored_keda_crds_are_valid_crds(kind: str) -> None:
    (crd,) = _load_all(KEDA_CRDS[kind])
    kubernetes_validate.validate(crd, K8S_VERSIONS[-1], strict=True)
    assert crd["spec"]["group"] == KEDA_API.split("/")[0]


@pytest.mark.parametrize("kind", sorted(KEDA_CRDS))
def test_keda_objects_match_the_crd_schema(docs: list[dict[str, Any]], kind: str) -> None:
    doc = only(docs, kind)
    assert doc["apiVersion"] == KEDA_API
    errors = sorted(crd_validator(kind).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_keda_schema_rejects_what_keda_would(docs: list[dict[str, Any]]) -> None:
    validator = crd_validator("ScaledObject")
    good = only(docs, "ScaledObject")
    broken = []
    typo = copy.deepcopy(good)
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")
    broken.append(typo)
    number = copy.deepcopy(good)
    number["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 5000  # metadata is strings
    broken.append(number)
    untargeted = copy.deepcopy(good)
    del untargeted["spec"]["scaleTargetRef"]
    broken.append(untargeted)
    for doc in broken:
        assert not validator.is_valid(doc)


# -- settings ---------------------------------------------------------------------------------


def test_every_segstream_variable_is_a_settings_field(docs: list[dict[str, Any]],
                                                      worker: dict[str, Any]) -> None:
    names = [v["name"] for v in worker.get("env", [])]
    for source in worker.get("envFrom", []):
        names += list(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    assert names
    # envFrom passes every key of the ConfigMap; only settings belong there.
    foreign = [n for n in names if not n.startswith(ENV_PREFIX)]
    assert not foreign, f"not SEGSTREAM_* variables: {foreign}"
    unknown = [n for n in names if n[len(ENV_PREFIX):].lower() not in Settings.model_fields]
    assert not unknown, f"not fields of stream.settings.Settings: {unknown}"
    assert len(names) == len(set(names)), "a variable is set twice"


def test_pod_environment_builds_the_settings(
    pod_settings: tuple[Settings, dict[str, Path]], env: dict[str, str]
) -> None:
    s, mounts = pod_settings
    for key, raw in env.items():
        value = getattr(s, key[len(ENV_PREFIX):].lower())
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool):
            assert value == (raw.lower() in ("1", "true", "yes", "on")), key
        elif isinstance(value, (int, float)):
            assert value == type(value)(raw), key
        else:
            assert str(value) == localize(raw, mounts), key


def test_credentials_come_from_the_secret(worker: dict[str, Any], secret: dict[str, Any]) -> None:
    from_secret = {v["name"] for v in worker.get("env", [])
                   if "secretKeyRef" in v.get("valueFrom", {})}
    for field in ("kafka_sasl_username", "kafka_sasl_password", "redis_url", "api_token",
                  "log_hash_key"):
        assert f"{ENV_PREFIX}{field.upper()}" in from_secret, field
    data = secret["stringData"]
    assert all("CHANGE-ME" in v for v in data.values()), "a template value is not a placeholder"
    assert secret.get("type") == "Opaque"


def test_secret_template_is_not_applied_by_kustomize() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert SECRET_TEMPLATE.name not in kust["resources"], (
        "`kubectl apply -k` would overwrite the real credentials with placeholders")


def test_data_dir_and_tmp_are_writable_volumes(
    deployment: dict[str, Any], worker: dict[str, Any], env: dict[str, str]
) -> None:
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    writable = {m["mountPath"] for m in worker["volumeMounts"]
                if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]}
    data_dir = PurePosixPath(env[f"{ENV_PREFIX}DATA_DIR"])
    assert any(data_dir == PurePosixPath(w) or PurePosixPath(w) in data_dir.parents
               for w in writable), f"{data_dir} is on the read-only root filesystem"
    assert "/tmp" in writable


# -- rules ------------------------------------------------------------------------------------


def test_rules_configmap_is_the_repository_catalogue(docs: list[dict[str, Any]]) -> None:
    data = named(docs, "ConfigMap", "segstream-rules")["data"]
    assert data["catalogue.yaml"] == (ROOT / "scorers" / "catalogue.yaml").read_text(), (
        "deploy/k8s/rules/catalogue.yaml differs from scorers/catalogue.yaml")
    assert data["actions.yaml"] == (ROOT / "scorers" / "actions.yaml").read_text(), (
        "deploy/k8s/rules/actions.yaml differs from scorers/actions.yaml")


def test_mounted_rules_pass_rules_validate(
    pod_settings: tuple[Settings, dict[str, Path]],
) -> None:
    from stream.cli import app
    from stream.runtime import load_rules

    s, _ = pod_settings
    assert s.rules_path is not None and s.actions_path is not None
    result = CliRunner().invoke(app, ["rules", "validate", str(s.rules_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["valid"] is True and doc["schemes"]
    catalogue, actions = load_rules(s)  # the actions are checked against the schemes
    assert set(catalogue.schemes) == set(doc["schemes"])
    assert actions.rules


def test_rules_are_mounted_as_a_directory(
    deployment: dict[str, Any], worker: dict[str, Any], env: dict[str, str]
) -> None:
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for key in ("RULES_PATH", "ACTIONS_PATH"):
        path = PurePosixPath(env[f"{ENV_PREFIX}{key}"])
        (mount,) = [m for m in worker["volumeMounts"]
                    if PurePosixPath(m["mountPath"]) in path.parents]
        assert "configMap" in volumes[mount["name"]], key
        # A subPath mount never sees ConfigMap updates, so the hot reload would never fire.
        assert "subPath" not in mount and "subPathExpr" not in mount, key


# -- probes, ports and the Service -------------------------------------------------------------


class _ReadyBackend:
    async def health(self) -> dict[str, Any]:
        return {}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {}

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a probe called {name}")


def _probe_status(path: str) -> int:
    async def go() -> int:
        app = web.Application()
        add_routes(app, _ReadyBackend(), EngineMetrics(), token="a-token")  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            resp = await client.get(path)  # the kubelet sends no Authorization header
            return resp.status

    return asyncio.run(go())


def _container_port(worker: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p for p in worker["ports"] if p.get("name") == port]
    return int(match["containerPort"])


@pytest.mark.parametrize(("probe", "path"), [("readinessProbe", "/readyz"),
                                             ("livenessProbe", "/healthz"),
                                             ("startupProbe", "/healthz")])
def test_probes_hit_served_routes_on_the_web_port(
    worker: dict[str, Any], settings: Settings, probe: str, path: str
) -> None:
    get = worker[probe]["httpGet"]
    assert get["path"] == path
    assert get.get("scheme", "HTTP") == "HTTP"
    assert _container_port(worker, get["port"]) == settings.web_port
    assert _probe_status(get["path"]) == 200


def test_worker_listens_where_the_kubelet_connects(worker: dict[str, Any],
                                                   settings: Settings) -> None:
    assert settings.web_host in ("0.0.0.0", "::"), "a loopback bind is unreachable from probes"
    assert any(p["containerPort"] == settings.web_port for p in worker["ports"])


def test_service_and_pdb_select_the_workers(docs: list[dict[str, Any]],
                                            deployment: dict[str, Any],
                                            worker: dict[str, Any], settings: Settings) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = only(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    targets = [_container_port(worker, p.get("targetPort", p["port"]))
               for p in service["spec"]["ports"]]
    assert settings.web_port in targets
    pdb = only(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


# -- the worker container -----------------------------------------------------------------------


def test_runs_the_image_worker_as_its_user(deployment: dict[str, Any],
                                           worker: dict[str, Any]) -> None:
    command = worker.get("command", []) + worker.get("args", [])
    assert command[-2:] == ["segstream", "worker"], command
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kust["images"]
    assert worker["image"] == f"{image['newName']}:{image['newTag']}"
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    (user,) = [ln.split()[1] for ln in lines if ln.startswith("USER ")][-1:]
    uid, _, gid = user.partition(":")
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert str(pod["runAsUser"]) == uid and str(pod["runAsGroup"]) == (gid or uid)
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    ctx = worker["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"


def test_graceful_shutdown(deployment: dict[str, Any], worker: dict[str, Any]) -> None:
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Faust's session timeout is 20 s: a worker killed sooner than that after SIGTERM has not
    # left the group cleanly, and its partitions wait for the timeout.
    assert grace >= 30
    pre = worker.get("lifecycle", {}).get("preStop")
    if pre:
        command = pre["exec"]["command"]
        assert command[0] == "sleep" and int(command[1]) < grace / 2


def test_resources_fit_the_measured_worker(worker: dict[str, Any]) -> None:
    peaks = [json.loads(p.read_text()).get("worker_rss_mb")
             for p in (ROOT / "bench" / "results").glob("*.json")]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    assert peaks, "no benchmark result with worker_rss_mb in bench/results"
    peak = max(peaks) * 1e6
    res = worker["resources"]
    assert quantity(res["requests"]["memory"]) >= 1.5 * peak
    assert quantity(res["limits"]["memory"]) >= 3 * peak
    assert quantity(res["limits"]["memory"]) >= quantity(res["requests"]["memory"])
    # The engine is CPU-bound in one Python process: a worker is sized as one busy core.
    assert quantity(res["requests"]["cpu"]) >= 1
    assert quantity(res["limits"]["cpu"]) >= quantity(res["requests"]["cpu"])


# -- autoscaling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_conf(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The Faust app configuration the worker builds (no connection is made)."""
    from stream.app import Engine

    s = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("data"),
                                    "rules_path": None, "actions_path": None})
    return Engine(s).app.conf


def test_scaledobject_targets_the_workers(docs: list[dict[str, Any]],
                                          deployment: dict[str, Any]) -> None:
    so = only(docs, "ScaledObject")["spec"]
    ref = so["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment"
    assert ref.get("apiVersion", "apps/v1") == "apps/v1"
    assert ref["name"] == deployment["metadata"]["name"]
    assert only(docs, "ScaledObject")["metadata"]["namespace"] == (
        deployment["metadata"]["namespace"])


def test_replicas_capped_at_the_partition_count(docs: list[dict[str, Any]],
                                                settings: Settings) -> None:
    so = only(docs, "ScaledObject")["spec"]
    assert so["maxReplicaCount"] == settings.partitions
    # Time-driven migrations, the learner and the API need a running worker without any lag.
    assert 1 <= so.get("minReplicaCount", 0) <= so["maxReplicaCount"]
    assert "idleReplicaCount" not in so
    if "fallback" in so:
        assert 1 <= so["fallback"]["replicas"] <= so["maxReplicaCount"]
    for trigger in so["triggers"]:
        # KEDA's own cap at the partition count is off with allowIdleConsumers.
        assert trigger["metadata"].get("allowIdleConsumers", "false") == "false"


def test_lag_triggers_watch_the_workers_group_and_topics(
    docs: list[dict[str, Any]], settings: Settings, engine_conf: Any
) -> None:
    triggers = only(docs, "ScaledObject")["spec"]["triggers"]
    assert triggers and all(t["type"] == "kafka" for t in triggers)
    assert engine_conf.id == settings.app_id  # Faust's consumer group is the app id
    topics = []
    for t in triggers:
        meta = t["metadata"]
        assert meta["consumerGroup"] == engine_conf.id
        assert meta["bootstrapServers"] == settings.kafka_bootstrap
        assert int(meta["lagThreshold"]) > 0
        assert meta.get("offsetResetPolicy", "latest") == engine_conf.consumer_auto_offset_reset
        assert "topic" in meta, "without a topic KEDA also counts the learner's topic"
        topics.append(meta["topic"])
    assert sorted(topics) == sorted(settings.input_topics)


def test_keda_speaks_the_workers_kafka_security(docs: list[dict[str, Any]], settings: Settings,
                                                worker: dict[str, Any],
                                                secret: dict[str, Any]) -> None:
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    env_keys = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in worker.get("env", [])
                if "secretKeyRef" in v.get("valueFrom", {})}
    for t in only(docs, "ScaledObject")["spec"]["triggers"]:
        meta = t["metadata"]
        assert meta.get("tls", "disable") == KEDA_TLS[settings.kafka_security_protocol]
        if settings.kafka_sasl_mechanism is None:
            assert meta.get("sasl", "none") == "none"
            continue
        assert meta.get("sasl") == KEDA_SASL[settings.kafka_sasl_mechanism]
        auth = auths[t["authenticationRef"]["name"]]
        refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
        for param, var in (("username", "KAFKA_SASL_USERNAME"),
                           ("password", "KAFKA_SASL_PASSWORD")):
            worker_ref = env_keys[f"{ENV_PREFIX}{var}"]
            assert (refs[param]["name"], refs[param]["key"]) == (
                worker_ref["name"], worker_ref["key"]), param
            assert refs[param]["key"] in secret["stringData"]
