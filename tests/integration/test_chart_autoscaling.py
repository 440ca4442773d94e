"""The vLLM pool's scaler (values `vllm.autoscaling`): a KEDA ScaledObject, or a plain HPA.

Rendered by the real helm binary; the ScaledObject is validated against KEDA's own CRD (../shared/crds, made
strict: unknown fields refused), the HPA and everything else against the Kubernetes schemas. Its Prometheus
triggers must name metrics that doppel's bot and vLLM really export, on the Services Prometheus scrapes.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from tests.integration.test_chart import KUBE_VERSIONS, container
from tests.integration.test_chart_monitoring import exported_metrics
from tests.support.helm import (
    NAMESPACE,
    HelmError,
    find_manifest,
    find_manifests,
    parse_manifests,
    rendered_env,
    template_chart,
    third_party_crd_schema,
)

from doppel.bot.config import BotConfig

KEDA_API = ["--api-versions", "keda.sh/v1alpha1"]
KEDA = {"vllm": {"autoscaling": {"keda": {"enabled": True}}}}
PREWARM = {
    "vllm": {
        "autoscaling": {
            "maxReplicas": 6,
            "idleSeconds": 1200,
            "keda": {
                "enabled": True,
                "prewarm": {"enabled": True, "timezone": "Europe/Berlin", "replicas": 2},
            },
        }
    }
}
HPA = {"vllm": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3, "hpa": {"enabled": True}}}}


def render(values: dict[str, Any], *, keda_installed: bool = True) -> list[dict[str, Any]]:
    return parse_manifests(template_chart(set_values=values, extra_args=KEDA_API if keda_installed else ()))


@pytest.fixture(scope="module")
def keda_schema() -> dict[str, Any]:
    return third_party_crd_schema("keda/keda.sh_scaledobjects.yaml")


@pytest.fixture(scope="module")
def prewarmed() -> list[dict[str, Any]]:
    return render(PREWARM)


def triggers(scaled: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in scaled["spec"]["triggers"]}


def test_keda_scales_the_vllm_deployment_from_zero_and_fits_kedas_crd(prewarmed, keda_schema):
    (scaled,) = find_manifests(prewarmed, "ScaledObject")
    jsonschema.Draft4Validator(keda_schema).validate(scaled)
    vllm = find_manifest(prewarmed, "Deployment", "vllm")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        vllm["apiVersion"],
        "Deployment",
        vllm["metadata"]["name"],
    )
    spec = scaled["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 6, 1200)
    # KEDA's CEL rule (not checked by a JSON schema): min <= max.
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    # The scaler owns the replica count: the Deployment leaves it out (helm upgrades would reset it).
    assert "replicas" not in vllm["spec"]
    assert not find_manifests(prewarmed, "HorizontalPodAutoscaler")
    for manifest in prewarmed:
        if manifest["apiVersion"].split("/")[0] in {"keda.sh", "kopf.dev", "monitoring.coreos.com"}:
            continue
        kubernetes_validate.validate(manifest, KUBE_VERSIONS[-1], strict=True)


def test_the_triggers_read_what_the_bot_and_vllm_export(prewarmed):
    (scaled,) = find_manifests(prewarmed, "ScaledObject")
    found = triggers(scaled)
    assert set(found) == {"held-mentions", "vllm-waiting", "working-hours"}
    held, waiting = found["held-mentions"], found["vllm-waiting"]
    assert held["type"] == waiting["type"] == "prometheus"
    # Any held mention wakes a pool at zero.
    assert held["metadata"]["activationThreshold"] == "0"
    exported = exported_metrics()
    (bot_metric,) = re.findall(r"\bdoppel_[a-z_]+", held["metadata"]["query"])
    assert bot_metric == "doppel_bot_mentions_waiting" and bot_metric in exported
    assert "vllm:num_requests_waiting" in waiting["metadata"]["query"]
    # Each query selects a Service that Prometheus scrapes: a metrics port, in this namespace.
    for trigger, component in ((held, "bot"), (waiting, "vllm")):
        query = trigger["metadata"]["query"]
        service = find_manifest(prewarmed, "Service", component)
        assert f'service="{service["metadata"]["name"]}"' in query
        assert f'namespace="{NAMESPACE}"' in query
        assert service["metadata"]["labels"]["doppel.dev/metrics"] == "true"
        assert "metrics" in [p["name"] for p in service["spec"]["ports"]]


def test_working_hours_prewarm_in_the_workspaces_time_zone(prewarmed):
    cron = triggers(find_manifests(prewarmed, "ScaledObject")[0])["working-hours"]
    assert cron["type"] == "cron"
    assert cron["metadata"] == {
        "timezone": "Europe/Berlin",
        "start": "0 8 * * 1-5",
        "end": "0 19 * * 1-5",
        "desiredReplicas": "2",
    }
    plain = render(KEDA)
    assert "working-hours" not in triggers(find_manifests(plain, "ScaledObject")[0])


def test_a_wrong_scaled_object_is_caught_by_kedas_crd(prewarmed, keda_schema):
    scaled = copy.deepcopy(find_manifests(prewarmed, "ScaledObject")[0])
    scaled["spec"]["cooldownPeriods"] = 10
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(keda_schema).validate(scaled)
    scaled = copy.deepcopy(find_manifests(prewarmed, "ScaledObject")[0])
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(keda_schema).validate(scaled)


def test_without_keda_the_chart_says_so_unless_told_to_render_anyway(keda_schema):
    with pytest.raises(HelmError, match=r"vllm\.autoscaling\.keda needs KEDA \(keda\.sh/v1alpha1\)"):
        render(KEDA, keda_installed=False)
    forced = {"vllm": {"autoscaling": {"keda": {"enabled": True, "assumeInstalled": True}}}}
    (scaled,) = find_manifests(render(forced, keda_installed=False), "ScaledObject")
    jsonschema.Draft4Validator(keda_schema).validate(scaled)


def test_keda_needs_the_metrics_it_scales_on():
    with pytest.raises(HelmError, match=r"vllm\.autoscaling\.keda needs metrics\.enabled"):
        render({**KEDA, "metrics": {"enabled": False}})


def test_hpa_for_clusters_without_keda():
    manifests = render(HPA, keda_installed=False)
    (hpa,) = find_manifests(manifests, "HorizontalPodAutoscaler")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)
    vllm = find_manifest(manifests, "Deployment", "vllm")
    assert hpa["spec"]["scaleTargetRef"]["name"] == vllm["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert "replicas" not in vllm["spec"] and not find_manifests(manifests, "ScaledObject")


def test_no_scaler_by_default_and_the_deployment_keeps_its_replicas():
    manifests = render({"vllm": {"replicas": 2}}, keda_installed=False)
    assert not find_manifests(manifests, "ScaledObject")
    assert not find_manifests(manifests, "HorizontalPodAutoscaler")
    assert find_manifest(manifests, "Deployment", "vllm")["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        # Two scalers would fight over the replica count.
        (
            {
                "vllm": {
                    "autoscaling": {"minReplicas": 1, "keda": {"enabled": True}, "hpa": {"enabled": True}}
                }
            },
            "/vllm/autoscaling/hpa/enabled",
        ),
        # An HPA cannot scale to zero.
        ({"vllm": {"autoscaling": {"hpa": {"enabled": True}}}}, "/vllm/autoscaling/minReplicas"),
        (
            {"vllm": {"autoscaling": {"keda": {"enabled": True, "prewarm": {"timezone": "CET+1"}}}}},
            "/vllm/autoscaling/keda/prewarm/timezone",
        ),
        (
            {"vllm": {"autoscaling": {"keda": {"enabled": True, "prewarm": {"start": "8am"}}}}},
            "/vllm/autoscaling/keda/prewarm/start",
        ),
        ({"vllm": {"autoscaling": {"maxReplicas": 0}}}, "/vllm/autoscaling/maxReplicas"),
        ({"vllm": {"autoscaling": {"kedaa": {}}}}, "kedaa"),
    ],
)
def test_impossible_combinations_are_schema_errors(values, complaint):
    with pytest.raises(HelmError) as caught:
        render(values)
    assert "schema" in str(caught.value) and complaint in str(caught.value)


@pytest.mark.parametrize("engine", ["keda", "hpa"])
def test_more_min_than_max_replicas_is_a_clear_error(engine):
    values = {"vllm": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2, engine: {"enabled": True}}}}
    with pytest.raises(
        HelmError, match=r"minReplicas \(5\) must not exceed vllm\.autoscaling\.maxReplicas \(2\)"
    ):
        render(values)
    prewarm = copy.deepcopy(PREWARM)
    prewarm["vllm"]["autoscaling"]["keda"]["prewarm"]["replicas"] = 9
    with pytest.raises(HelmError, match=r"prewarm\.replicas must not exceed"):
        render(prewarm)


def test_the_bot_gets_the_wake_up_estimate_and_deadline(prewarmed):
    values = {"vllm": {"autoscaling": {"wakeEstimateSeconds": 240, "wakeDeadlineSeconds": 1800}}}
    env = rendered_env(render(values, keda_installed=False), "bot")
    config = BotConfig.from_env(env)
    assert (config.wake_estimate_s, config.wake_deadline_s) == (240.0, 1800.0)
    bot = find_manifest(prewarmed, "Deployment", "bot")
    assert "DOPPEL_WAKE_DEADLINE_S" in {e["name"] for e in container(bot, "bot")["env"]}
