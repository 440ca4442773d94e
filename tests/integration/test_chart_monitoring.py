"""The chart's monitoring and peering objects: metrics ports, ServiceMonitor, PrometheusRule, dashboard,
KopfPeering.

`helm template` renders them; kubernetes-validate has no schema for monitoring.coreos.com or kopf.dev, so
the ServiceMonitor and PrometheusRule are checked against the fields of the Prometheus Operator's CRDs that
the chart uses (a small JSON schema, unknown fields refused), and the KopfPeering against the kopf CRD the
chart ships. Every alert and dashboard query names only metrics doppel really exports.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from tests.integration.test_chart import container, env_of
from tests.support.helm import (
    CHART_DIR,
    NAMESPACE,
    HelmError,
    find_manifest,
    find_manifests,
    render_chart,
    rendered_env,
    template_chart,
)

from doppel.bot.metrics import BotMetrics
from doppel.cli import main
from doppel.operator.metrics import OperatorMetrics

MONITORING = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name", "labels"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": LABELS,
    },
}
DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
# The fields of monitoring.coreos.com/v1 the chart uses, as the Prometheus Operator's CRDs define them.
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": LABELS},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["alert", "expr", "labels", "annotations"],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "labels": LABELS,
        "annotations": {
            "type": "object",
            "required": ["summary", "description"],
            "additionalProperties": {"type": "string"},
        },
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {"name": {"type": "string"}, "rules": {"type": "array", "items": RULE}},
                    },
                }
            },
        },
    },
}


def exported_metrics() -> set[str]:
    """Every series name the operator and the bot can export (counters as _total, histograms as _bucket)."""
    names: set[str] = set()
    for registry in (OperatorMetrics().registry, BotMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum"))
    return names


def doppel_names(expr: str) -> set[str]:
    return set(re.findall(r"\bdoppel_[a-z_]+", expr))


@pytest.fixture(scope="module")
def monitored() -> list[dict[str, Any]]:
    return render_chart(set_values={**MONITORING, "operator": {"replicas": 2}})


def test_monitoring_objects_are_off_by_default_and_valid_when_on(monitored):
    default = render_chart()
    assert not find_manifests(default, "ServiceMonitor") and not find_manifests(default, "PrometheusRule")
    jsonschema.Draft7Validator(SERVICE_MONITOR).validate(
        find_manifest(monitored, "ServiceMonitor", "metrics")
    )
    rule = find_manifest(monitored, "PrometheusRule", "alerts")
    jsonschema.Draft7Validator(PROMETHEUS_RULE).validate(rule)
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "DoppelUserFailed",
        "DoppelTrainingQueueStuck",
        "DoppelVllmDriftNotRepaired",
        "DoppelBotErrors",
    }
    # Templated for Prometheus, not for helm: the alert's own template braces survive rendering.
    assert "{{ $labels.namespace }}" in alerts["DoppelUserFailed"]["annotations"]["summary"]
    assert "[120m]" in alerts["DoppelTrainingQueueStuck"]["expr"]
    exported = exported_metrics()
    for name, alert in alerts.items():
        used = doppel_names(alert["expr"])
        assert used and used <= exported, f"{name} uses {used - exported}"


def test_a_wrong_monitoring_object_is_caught(monitored):
    monitor = json.loads(json.dumps(find_manifest(monitored, "ServiceMonitor", "metrics")))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SERVICE_MONITOR).validate(monitor)
    assert doppel_names("rate(doppel_bot_erors_total[5m])") - exported_metrics() == {"doppel_bot_erors_total"}


def test_the_service_monitor_scrapes_each_metrics_port_and_only_those(monitored):
    monitor = find_manifest(monitored, "ServiceMonitor", "metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    selected = [
        s for s in find_manifests(monitored, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert sorted(s["metadata"]["name"] for s in selected) == ["doppel-bot", "doppel-operator", "doppel-vllm"]
    for service in selected:
        (port,) = [
            p for p in service["spec"]["ports"] if p["name"] == monitor["spec"]["endpoints"][0]["port"]
        ]
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        pods = find_manifest(monitored, "Deployment", component)["spec"]["template"]["spec"]["containers"]
        names = [p["name"] for c in pods for p in c.get("ports", [])]
        assert port["targetPort"] in names, service["metadata"]["name"]
    # vLLM's metrics through the proxy: its own port, /metrics only.
    conf = find_manifest(monitored, "ConfigMap", "chat-proxy")["data"]["default.conf"]
    metrics_server = conf[conf.index("listen 9091;") :]
    assert "location = /metrics { proxy_pass http://127.0.0.1:8000; }" in metrics_server
    assert "location / { return 403; }" in metrics_server and "lora" not in metrics_server


def test_metrics_sources_limit_who_scrapes_vllm():
    sources = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    manifests = render_chart(set_values={"metrics": {"sources": sources}})
    policy = find_manifest(manifests, "NetworkPolicy", "vllm")
    (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": 9091, "protocol": "TCP"}]]
    assert rule["from"] == sources


def test_metrics_off_serves_nothing_and_monitors_nothing():
    manifests = render_chart(set_values={"metrics": {"enabled": False}})
    assert rendered_env(manifests, "operator")["DOPPEL_METRICS_PORT"] == "0"
    assert rendered_env(manifests, "bot")["DOPPEL_METRICS_PORT"] == "0"
    assert [s["metadata"]["name"] for s in find_manifests(manifests, "Service")] == [
        "doppel-bot",
        "doppel-vllm",
    ]
    for service in find_manifests(manifests, "Service"):
        assert "metrics" not in [p["name"] for p in service["spec"]["ports"]]
    with pytest.raises(HelmError, match=r"metrics\.serviceMonitor needs metrics\.enabled"):
        template_chart(set_values={"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})


def test_two_operator_replicas_share_the_charts_peering(monitored, monkeypatch):
    operator = find_manifest(monitored, "Deployment", "operator")
    assert operator["spec"]["replicas"] == 2 and operator["spec"]["strategy"]["type"] == "RollingUpdate"
    (peering,) = find_manifests(monitored, "KopfPeering")
    crds = {c["metadata"]["name"]: c for c in find_manifests(monitored, "CustomResourceDefinition")}
    schema = crds["kopfpeerings.kopf.dev"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(peering)
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    # `doppel operator` reads the chart's environment: that peering, the pod's name as peer id, metrics on.
    env = rendered_env(monitored, "operator")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    params = main.commands["operator"].make_context("operator", []).params
    assert (params["peering"], params["peer_id"]) == (peering["metadata"]["name"], "operator-pod")
    assert params["metrics_port"] == 9090
    assert env_of(operator, "operator")["DOPPEL_PEER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    ports = {port["name"]: port["containerPort"] for port in container(operator, "operator")["ports"]}
    assert int(env["DOPPEL_METRICS_PORT"]) == ports["metrics"]
    role = find_manifest(monitored, "Role", "operator")
    (rule,) = [r for r in role["rules"] if r["apiGroups"] == ["kopf.dev"]]
    assert rule == {
        "apiGroups": ["kopf.dev"],
        "resources": ["kopfpeerings"],
        "verbs": ["list", "watch", "patch"],
    }


def test_grafana_dashboard_queries_what_doppel_and_vllm_export():
    dashboard = json.loads((CHART_DIR / "examples" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = set().union(*(doppel_names(e) for e in exprs))
    exported = exported_metrics()
    assert used <= exported, used - exported
    # Every metric family doppel exports is on the dashboard.
    families = {n for n in exported if not n.endswith(("_total", "_bucket", "_count", "_sum"))}
    shown = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    assert families <= shown, families - shown
    assert any(e.startswith("sum(vllm:") or "vllm:" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
