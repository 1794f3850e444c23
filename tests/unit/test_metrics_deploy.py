"""Metrics, alert rules and the Grafana dashboard agree with each other.

``promtool`` (Debian package ``prometheus``) checks and unit-tests the rules; every
``segstream_*`` name in the dashboard must be one the worker exposes, and in the rules one
the worker or the trigger consumer (``segstream triggers --metrics-port``) exposes.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream import triggers_metrics
from stream.metrics import METRIC_NAMES, METRIC_TYPES, EngineMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "segstream.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)"
)

_IDENT = re.compile(r"\bsegstream_[a-z0-9_]+")
_SUFFIXES = {"_bucket": "histogram", "_sum": "histogram", "_count": "histogram",
             "_total": "counter"}


def family_of(sample: str, types: dict[str, str] = METRIC_TYPES) -> str | None:
    """The metric family a sample name belongs to, if it is one of ``types`` (default:
    the worker's)."""
    if types.get(sample) == "gauge":
        return sample
    for suffix, kind in _SUFFIXES.items():
        base = sample.removesuffix(suffix)
        if base != sample and types.get(base) == kind:
            return base
    return None


def _exprs_in_alerts() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def _exprs_in_dashboard() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def _names(exprs: list[str]) -> set[str]:
    # Label values and legends ("{{model}}") never start with segstream_, so a rough scan works.
    return {m for e in exprs for m in _IDENT.findall(e)}


# -- metrics ---------------------------------------------------------------------------------


def exercised() -> EngineMetrics:
    m = EngineMetrics()
    m.events_in("clickstream", 5)
    m.dead_letter("too_late")
    m.skipped("duplicate", 2)
    m.observe_batch(5, 0.01, wait_s=0.04)
    m.observe_batch(3, 0.02, wait_s=-0.5)  # producer clock ahead: counted as no wait
    m.migration("rfm", "Loyal", "At Risk", latency_s=0.02)
    m.migration("rfm", None, "New Customers")
    m.observe_latency(0.5)
    m.set_lag("clickstream", 0, 7)
    m.set_partitions_assigned(6)
    m.observe_loop_lag(0.003)
    m.observe_loop_lag(-0.001)  # a clock step back: counted as on time
    m.observe_gc(0, 0.0004)
    m.observe_stage("evaluate", 0.02)
    m.observe_gc(2, 0.03)
    m.observe_sweep_step(40, 0.007)
    m.observe_sweep_step(0, 0.0004)
    with m.redis_call("load"):
        pass
    with pytest.raises(ConnectionError), m.redis_call("commit"):
        raise ConnectionError("down")
    m.set_segment_sizes({"rfm": {"Loyal": 10, "At Risk": 3}})
    m.set_model_quality("churn", {"auc": 0.8, "log_loss": 0.4, "examples": 100, "version": 2,
                                  "drift_alarms": 1})
    m.set_action_lift([{"action_id": "winback", "segment": "At Risk",
                        "treated": {"exposed": 90, "converted": 9, "rate": 0.1},
                        "holdout": {"exposed": 10, "converted": 0, "rate": 0.0},
                        "uplift": 0.1, "lift": None, "p_value": 0.2},
                       {"action_id": "upsell", "segment": "Loyal",
                        "treated": {"exposed": 50, "converted": 10, "rate": 0.2},
                        "holdout": {"exposed": 50, "converted": 5, "rate": 0.1},
                        "uplift": 0.1, "lift": 1.0, "p_value": 0.1}])
    m.set_engine_now(1_709_294_400_000)
    m.set_outbox_pending(2)
    m.set_worker_state(ready=True)
    m.set_rules("3f2a", "9c1d")
    m.rules_reload_failed()
    m.observe_inbox(7, 2)
    m.observe_inbox(0, 1)
    return m


def _samples(m: EngineMetrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in m.render()[0].decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metric_names_are_what_a_scrape_shows() -> None:
    shown = {key.split("{")[0] for key in _samples(exercised())}
    assert shown == METRIC_NAMES
    assert all(name.startswith("segstream_") for name in METRIC_NAMES)


def test_helpers_set_the_values() -> None:
    s = _samples(exercised())
    assert s['segstream_events_in_total{topic="clickstream"}'] == 5
    assert s['segstream_migrations_total{from_segment="",scheme="rfm",to_segment="New Customers"}'
             ] == 1
    assert s["segstream_migration_latency_seconds_count"] == 2
    assert s["segstream_batch_wait_seconds_count"] == 2
    assert s['segstream_batch_wait_seconds_bucket{le="0.005"}'] == 1
    assert s['segstream_batch_wait_seconds_bucket{le="0.03"}'] == 1
    assert s['segstream_batch_wait_seconds_bucket{le="0.05"}'] == 2
    assert s["segstream_batch_wait_seconds_sum"] == pytest.approx(0.04)
    assert s['segstream_event_loop_lag_seconds_bucket{le="0.001"}'] == 1
    assert s['segstream_event_loop_lag_seconds_bucket{le="0.005"}'] == 2
    assert s["segstream_event_loop_lag_seconds_sum"] == pytest.approx(0.003)
    assert s['segstream_gc_pause_seconds_bucket{generation="0",le="0.0005"}'] == 1
    assert s['segstream_batch_stage_seconds_bucket{le="0.025",stage="evaluate"}'] == 1
    assert s['segstream_batch_stage_seconds_bucket{le="0.01",stage="evaluate"}'] == 0
    assert s['segstream_gc_pause_seconds_bucket{generation="2",le="0.025"}'] == 0
    assert s['segstream_gc_pause_seconds_bucket{generation="2",le="0.05"}'] == 1
    assert s["segstream_sweep_customers_total"] == 40
    assert s["segstream_sweep_step_seconds_count"] == 2
    assert s['segstream_sweep_step_seconds_bucket{le="0.005"}'] == 1
    assert s['segstream_sweep_step_seconds_bucket{le="0.01"}'] == 2
    assert s['segstream_migration_latency_seconds_bucket{le="0.02"}'] == 1
    assert s['segstream_redis_errors_total{op="commit"}'] == 1
    assert s['segstream_redis_roundtrip_seconds_count{op="commit"}'] == 1
    assert s['segstream_model_drift_alarms_total{model="churn"}'] == 1
    assert s['segstream_action_exposures{action="winback",arm="holdout",segment="At Risk"}'] == 10
    assert s["segstream_engine_now_seconds"] == 1_709_294_400
    assert s["segstream_rules_reload_failures_total"] == 1
    assert s["segstream_events_unaligned_total"] == 7
    assert s["segstream_input_partitions_paused"] == 1
    assert s['segstream_rules_info{actions="9c1d",catalogue="3f2a"}'] == 1
    lifts = [k for k in s if k.startswith("segstream_action_lift{")]
    assert lifts == ['segstream_action_lift{action="upsell",segment="Loyal"}'], "unknown lift"


def test_stale_labels_are_dropped_and_drift_total_is_followed() -> None:
    m = exercised()
    m.set_segment_sizes({"rfm": {"Loyal": 11}})
    m.set_lags({("transactions", 1): 3})
    m.set_model_quality("churn", {"drift_alarms": 3})
    m.set_model_quality("churn", {"drift_alarms": 3})
    s = _samples(m)
    assert [k for k in s if k.startswith("segstream_segment_customers")] == [
        'segstream_segment_customers{scheme="rfm",segment="Loyal"}']
    m.set_rules("3f2b", "9c1d")
    assert [k for k in _samples(m) if k.startswith("segstream_rules_info")] == [
        'segstream_rules_info{actions="9c1d",catalogue="3f2b"}']
    assert [k for k in s if k.startswith("segstream_consumer_lag")] == [
        'segstream_consumer_lag{partition="1",topic="transactions"}']
    assert s['segstream_model_drift_alarms_total{model="churn"}'] == 3


def test_latency_buckets_resolve_5ms_to_10s() -> None:
    from stream.metrics import LATENCY_BUCKETS

    assert LATENCY_BUCKETS[0] <= 0.005 and 10.0 in LATENCY_BUCKETS
    # a migration held back for minutes (a topic refusing records) is not read as 30 s
    assert LATENCY_BUCKETS[-1] >= 3600
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS)]
    assert max(ratios) <= 2.5, "buckets too coarse for useful quantiles"


@pytest.mark.parametrize(
    ("sample", "family"),
    [("segstream_batch_size_bucket", "segstream_batch_size"),
     ("segstream_events_in_total", "segstream_events_in"),
     ("segstream_consumer_lag", "segstream_consumer_lag"),
     ("segstream_events_in", None),  # a counter is only ever scraped as *_total
     ("segstream_consumer_lag_total", None),
     ("segstream_events_in_bucket", None)],
)
def test_family_of(sample: str, family: str | None) -> None:
    assert family_of(sample) == family


# -- alert rules and dashboard ---------------------------------------------------------------


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_used_is_exposed(source: str) -> None:
    exprs = _exprs_in_alerts() if source == "alerts" else _exprs_in_dashboard()
    used = _names(exprs)
    assert used
    names, types = METRIC_NAMES, METRIC_TYPES
    if source == "alerts":  # the trigger consumer's too
        names = names | triggers_metrics.METRIC_NAMES
        types = {**types, **triggers_metrics.METRIC_TYPES}
    unknown = sorted(n for n in used if n not in names or family_of(n, types) is None)
    assert not unknown, f"{source} uses metrics nothing exposes: {unknown}"


#: Gauges every worker exports with the same deployment-wide value.
DEPLOYMENT_WIDE = ("segstream_segment_customers", "segstream_action_lift",
                   "segstream_action_uplift", "segstream_action_exposures",
                   "segstream_action_conversions")


def test_the_dashboard_does_not_add_up_what_every_worker_reports() -> None:
    """With N workers a sum of a deployment-wide gauge is N times the count; a ratio of two
    sums (a conversion rate) is still right."""
    for expr in _exprs_in_dashboard():
        if expr.startswith("label_values("):
            continue
        used = [n for n in DEPLOYMENT_WIDE if n in expr]
        if not used or ("/" in expr and all(n.startswith("segstream_action_") for n in used)
                        and "sum by" in expr and expr.count("sum by") == 2):
            continue
        assert expr.startswith("max by ("), expr


def test_every_metric_family_is_on_the_dashboard() -> None:
    families = {family_of(n) for n in _names(_exprs_in_dashboard())}
    missing = sorted(set(METRIC_TYPES) - families)
    assert not missing, f"not on the Grafana dashboard: {missing}"


def test_alerts_cover_the_operational_failures() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    names = {r["alert"] for g in doc["groups"] for r in g["rules"]}
    assert {"SegstreamConsumerLagGrowing", "SegstreamNoEventsIn", "SegstreamDeadLetterRateHigh",
            "SegstreamModelAUCDrop", "SegstreamModelDrift", "SegstreamRedisErrors",
            "SegstreamWorkerDown"} <= names
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]


@needs_promtool
def test_promtool_check_rules() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)],  # type: ignore[list-item]
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    # The config names the rule file by its path inside the container.
    text = PROMETHEUS.read_text().replace("/etc/prometheus/alerts.yml", str(ALERTS))
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    out = subprocess.run([PROMTOOL, "check", "config", str(config)],  # type: ignore[list-item]
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _alert(name: str, at: str, labels: dict[str, str] | None,
           annotations: dict[str, str] | None = None) -> dict[str, Any]:
    exp = [] if labels is None else [{"exp_labels": labels,
                                      "exp_annotations": annotations or {}}]
    return {"eval_time": at, "alertname": name, "exp_alerts": exp}


def _annotations(name: str) -> dict[str, str]:
    doc = yaml.safe_load(ALERTS.read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == name)
    return dict(rule["annotations"])


RULE_TESTS: list[dict[str, Any]] = [
    {   # the scrape fails from minute 6
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="segstream-worker",instance="w1"}', "values": "1x5 0x10"},
        ],
        "alert_rule_test": [
            _alert("SegstreamWorkerDown", "5m", None),
            _alert("SegstreamWorkerDown", "10m",
                   {"severity": "critical", "job": "segstream-worker", "instance": "w1"},
                   {**_annotations("SegstreamWorkerDown"),
                    "summary": "segstream worker w1 is down"}),
        ],
    },
    {   # input stops at minute 10; the worker keeps running
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_events_in_total{topic="clickstream"}',
             "values": "0+100x10 1000x40"},
            {"series": 'segstream_worker_up{instance="w1"}', "values": "1x50"},
        ],
        "alert_rule_test": [
            _alert("SegstreamNoEventsIn", "15m", None),
            # "no input events consumed for 15 minutes": not at 13, yes at 26
            _alert("SegstreamNoEventsIn", "23m", None),
            _alert("SegstreamNoEventsIn", "26m", {"severity": "warning"},
                   _annotations("SegstreamNoEventsIn")),
            _alert("SegstreamNoEventsIn", "40m", {"severity": "warning"},
                   _annotations("SegstreamNoEventsIn")),
        ],
    },
    {   # the webhook slows down at minute 5: the lag grows by 200 a minute from then on
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_triggers_consumer_lag{instance="t1",partition="0"}',
             "values": "0x5 0+200x40"},
            {"series": 'segstream_triggers_consumer_lag{instance="t1",partition="1"}',
             "values": "3x45"},
        ],
        "alert_rule_test": [
            # over 1,000 from minute 11 on, growing; then 10 minutes "for"
            _alert("SegstreamTriggersLagGrowing", "15m", None),
            _alert("SegstreamTriggersLagGrowing", "25m",
                   {"severity": "warning", "instance": "t1"},
                   {**_annotations("SegstreamTriggersLagGrowing"),
                    "summary": "trigger consumer t1 falls behind the migrations (3803 not "
                               "handled)"}),
        ],
    },
    {   # t1's webhook fails every POST from minute 10; t2's only retries some, and posts
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_triggers_retries_total{instance="t1"}',
             "values": "0x10 0+30x30"},
            {"series": 'segstream_triggers_migrations_total{instance="t1",outcome="posted"}',
             "values": "0+50x10 500x30"},
            {"series": 'segstream_triggers_retries_total{instance="t2"}',
             "values": "0+5x40"},
            {"series": 'segstream_triggers_migrations_total{instance="t2",outcome="posted"}',
             "values": "0+50x40"},
        ],
        "alert_rule_test": [
            _alert("SegstreamTriggersWebhookFailing", "12m", None),
            # nothing posted in the last 10 minutes from minute 20; then 5 minutes "for"
            _alert("SegstreamTriggersWebhookFailing", "27m",
                   {"severity": "critical", "instance": "t1"},
                   {**_annotations("SegstreamTriggersWebhookFailing"),
                    "summary": "the webhook of trigger consumer t1 has taken no migration "
                               "for 10 minutes"}),
        ],
    },
    {   # three rejections at minute 10
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_triggers_migrations_total{instance="t1",outcome="rejected"}',
             "values": "0x10 3x30"},
        ],
        "alert_rule_test": [
            _alert("SegstreamTriggersRejected", "9m", None),
            _alert("SegstreamTriggersRejected", "11m",
                   {"severity": "warning", "instance": "t1"},
                   {**_annotations("SegstreamTriggersRejected"),
                    "summary": "the webhook of trigger consumer t1 rejected 3 migrations in "
                               "15 minutes"}),
            _alert("SegstreamTriggersRejected", "30m", None),
        ],
    },
    {   # publishing fails from minute 5 on (a topic refuses the records)
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_publish_failures_total{instance="w1"}',
             "values": "0x5 0+40x30"},
        ],
        "alert_rule_test": [
            _alert("SegstreamPublishFailing", "5m", None),
            _alert("SegstreamPublishFailing", "12m", None),
            _alert("SegstreamPublishFailing", "20m", {"severity": "critical"},
                   _annotations("SegstreamPublishFailing")),
        ],
    },
    {   # 10 % of the input goes to the DLQ
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_events_in_total{topic="transactions"}', "values": "0+600x30"},
            {"series": 'segstream_dlq_records_total{reason="too_late"}', "values": "0+60x30"},
        ],
        "alert_rule_test": [
            _alert("SegstreamDeadLetterRateHigh", "25m", {"severity": "warning"},
                   {**_annotations("SegstreamDeadLetterRateHigh"),
                    "summary": "10% of input records go to the DLQ"}),
        ],
    },
    {   # lag above 1000 and rising for 20 minutes
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_consumer_lag{topic="clickstream",partition="0"}',
             "values": "500+100x40"},
        ],
        "alert_rule_test": [
            _alert("SegstreamConsumerLagGrowing", "3m", None),
            _alert("SegstreamConsumerLagGrowing", "30m",
                   {"severity": "warning", "topic": "clickstream"},
                   {**_annotations("SegstreamConsumerLagGrowing"),
                    "summary": "consumer lag on clickstream keeps growing (3500 records)"}),
        ],
    },
    {   # the event loop runs on time for 20 minutes, then half its checks wake 1-2.5 s late
        "interval": "1m",
        "input_series": [
            {"series": f'segstream_event_loop_lag_seconds_bucket{{instance="w1",le="{le}"}}',
             "values": values}
            for le, values in (("0.01", "0+120x20 2400+60x20"), ("1.0", "0+120x20 2400+60x20"),
                               ("2.5", "0+120x40"), ("+Inf", "0+120x40"))
        ],
        "alert_rule_test": [
            _alert("SegstreamEventLoopStalls", "15m", None),
            _alert("SegstreamEventLoopStalls", "40m", {"severity": "warning", "instance": "w1"},
                   {**_annotations("SegstreamEventLoopStalls"),
                    "summary": "w1: the worker's event loop runs 2.47s late (p99)"}),
        ],
    },
    {   # on time, except one check at minute 20 that woke 12 s late
        "interval": "1m",
        "input_series": [
            {"series": f'segstream_event_loop_lag_seconds_{name}{{instance="w1"{le}}}',
             "values": values}
            for name, le, values in (("count", "", "0+120x20 2521+120x20"),
                                     ("bucket", ',le="5.0"', "0+120x40"))
        ],
        "alert_rule_test": [
            _alert("SegstreamEventLoopHeld", "15m", None),
            _alert("SegstreamEventLoopHeld", "25m", {"severity": "warning", "instance": "w1"},
                   _annotations("SegstreamEventLoopHeld")
                   | {"summary": "w1: the worker's event loop was held for more than 5 s"}),
            _alert("SegstreamEventLoopHeld", "35m", None),  # ten minutes later
        ],
    },
    {   # AUC falls from 0.85 to 0.75 after an hour; one drift alarm
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_model_auc{model="churn"}', "values": "0.85x60 0.75x60"},
            {"series": 'segstream_model_examples{model="churn"}', "values": "5000x120"},
            {"series": 'segstream_model_drift_alarms_total{model="churn"}',
             "values": "0x60 1x60"},
            {"series": 'segstream_redis_errors_total{op="commit"}', "values": "0+3x20"},
        ],
        "alert_rule_test": [
            _alert("SegstreamModelAUCDrop", "50m", None),
            _alert("SegstreamModelAUCDrop", "90m", {"severity": "warning", "model": "churn"},
                   {**_annotations("SegstreamModelAUCDrop"),
                    "summary": "churn AUC dropped to 0.750"}),
            _alert("SegstreamModelDrift", "65m", {"severity": "info", "model": "churn"},
                   {**_annotations("SegstreamModelDrift"),
                    "summary": "drift detected on churn"}),
            _alert("SegstreamRedisErrors", "10m", {"severity": "critical"},
                   {**_annotations("SegstreamRedisErrors"),
                    "summary": "15 Redis errors in 5 minutes"}),
        ],
    },
    {   # w2 refuses an edit at minute 10 and keeps the old rules; w1 loads it
        "interval": "1m",
        "input_series": [
            {"series": 'segstream_rules_reload_failures_total{instance="w2"}',
             "values": "0x10 1x40"},
            {"series": 'segstream_rules_info{instance="w1",catalogue="a",actions="x"}',
             "values": "1x10 _x40"},
            {"series": 'segstream_rules_info{instance="w1",catalogue="b",actions="x"}',
             "values": "_x10 1x40"},
            {"series": 'segstream_rules_info{instance="w2",catalogue="a",actions="x"}',
             "values": "1x50"},
        ],
        "alert_rule_test": [
            _alert("SegstreamRulesReloadRefused", "9m", None),
            _alert("SegstreamRulesReloadRefused", "12m",
                   {"severity": "warning", "instance": "w2"},
                   {**_annotations("SegstreamRulesReloadRefused"),
                    "summary": "w2 refused an edit of the segment catalogue or the actions "
                               "file"}),
            # the refusal is an event: it stops firing once it is 15 minutes old
            _alert("SegstreamRulesReloadRefused", "30m", None),
            _alert("SegstreamRulesDiffer", "9m", None),
            _alert("SegstreamRulesDiffer", "20m", None),
            _alert("SegstreamRulesDiffer", "30m", {"severity": "warning"},
                   {**_annotations("SegstreamRulesDiffer"),
                    "summary": "workers have run 2 different versions of the rules for 15 "
                               "minutes"}),
        ],
    },
]


@needs_promtool
def test_promtool_rule_unit_tests(tmp_path: Path) -> None:
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": RULE_TESTS}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run([PROMTOOL, "test", "rules", str(path)],  # type: ignore[list-item]
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_dashboard_and_provisioning() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "segstream" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "segstream.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_grafana_panels_do_not_overlap() -> None:
    dash = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_a_collection_noted_while_a_scrape_holds_the_histogram_lock_does_not_wait() -> None:
    """A collection can start on the thread that is scraping, inside the histogram's
    (non-reentrant) lock; noting it must not take that lock."""
    import threading

    m = EngineMetrics()
    hist = m._m["gc_pause_seconds"]

    def scrape_interrupted_by_a_collection() -> None:
        with hist._lock:
            m.observe_gc(2, 0.03)

    t = threading.Thread(target=scrape_interrupted_by_a_collection, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "observe_gc waited for a lock its own thread held"
    assert _samples(m)['segstream_gc_pause_seconds_count{generation="2"}'] == 1


def test_known_label_values_are_exported_at_zero_before_their_first_increment() -> None:
    """Prometheus takes a series' first sample as its start: a burst of 300 dead letters
    of a reason never seen before showed as no increase at all."""
    m = EngineMetrics()
    m.prime(["p.clickstream", "p.transactions"])
    s = _samples(m)
    assert s['segstream_events_in_total{topic="p.clickstream"}'] == 0
    assert s['segstream_events_in_total{topic="p.transactions"}'] == 0
    assert s['segstream_dlq_records_total{reason="not_utf8"}'] == 0
    assert s['segstream_events_skipped_total{reason="duplicate"}'] == 0
    assert s['segstream_redis_errors_total{op="commit"}'] == 0
    m.dead_letter("not_utf8", 300)
    assert _samples(m)['segstream_dlq_records_total{reason="not_utf8"}'] == 300


def test_every_dead_letter_reason_is_primed() -> None:
    from stream.metrics import DLQ_REASONS

    used = set()
    for path in (ROOT / "stream").glob("*.py"):
        used |= set(re.findall(r'Rejection\(\s*"([a-z_]+)"', path.read_text()))
    assert {"not_json", "too_late", "invalid_schema"} <= used  # the scan finds them
    assert used <= set(DLQ_REASONS), sorted(used - set(DLQ_REASONS))


def test_the_trigger_consumer_exposes_the_families_the_rules_may_use() -> None:
    """What a scrape of the trigger consumer shows is what the rules' check allows."""
    import asyncio

    from stream.triggers import TriggerStats
    from stream.triggers_metrics import OUTCOMES, TriggerMetrics

    class _Runner:
        stats = TriggerStats(posted=7, rejected=2, retries=3, commits=1)
        position: dict[Any, int] = {}

    metrics = TriggerMetrics(_Runner())  # type: ignore[arg-type]
    metrics.lags = {0: 5, 2: 0}
    metrics.observe_request(0.02)
    text = asyncio.run(metrics.exposition()).decode()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    # every sample is one of the declared families' names, and every family shows
    assert samples <= triggers_metrics.METRIC_NAMES, samples - triggers_metrics.METRIC_NAMES
    assert {family_of(n, triggers_metrics.METRIC_TYPES) for n in samples} == set(
        triggers_metrics.METRIC_TYPES)
    assert 'segstream_triggers_migrations_total{outcome="posted"} 7.0' in text
    assert 'segstream_triggers_migrations_total{outcome="rejected"} 2.0' in text
    assert 'segstream_triggers_consumer_lag{partition="0"} 5.0' in text
    assert "segstream_triggers_retries_total 3.0" in text
    assert len(OUTCOMES) == 8  # every count of TriggerStats but retries and commits
    assert {a for _, a in OUTCOMES} | {"retries", "commits"} == set(vars(TriggerStats()))
