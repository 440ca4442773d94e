"""What a cluster admin checks before letting the chart in: every pod it renders, and every Job pod the
operator it configures creates, passes Pod Security "restricted" and has CPU and memory requests and a
memory limit; PodDisruptionBudgets and selectors are scoped to their component and release; RBAC holds no
wildcards; per-component security, priority, proxy and environment values reach the pods.

The pods are rendered by the real helm (tests/support/helm.py) and checked against the Pod Security
Standards' documented rules (tests/support/pod_security.py) and the Kubernetes schemas (kubernetes-validate).
The Job pods are built by the operator's own code from the configuration `doppel operator` reads out of the
chart's environment.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests.support.helm import (
    CHART_DIR,
    HelmError,
    find_manifest,
    find_manifests,
    helm,
    render_chart,
    rendered_env,
    template_chart,
)
from tests.support.pod_security import (
    pod_specs,
    qos_class,
    resource_violations,
    restricted_violations,
)

from doppel.api import DoppelUserSpec, with_vllm_selector
from doppel.cli import main
from doppel.cli.operator import operator_config
from doppel.operator import jobs
from doppel.operator.config import OperatorConfig

SCALED_VALUES = CHART_DIR / "examples" / "values-scaled.yaml"
EXAMPLE_DOPPELUSER = CHART_DIR / "examples" / "doppeluser.yaml"
OAUTH = {"slack": {"botToken": "", "clientId": "123.456", "clientSecret": "oauth-secret"}}
DIGEST = "sha256:" + "ab" * 32
PROXY = "http://proxy.corp:3128"
# Everything an admin of a locked-down cluster turns on at once.
ADMIN_VALUES: dict[str, Any] = {
    "images": {"app": {"digest": DIGEST}, "workerCpu": {"digest": DIGEST}},
    "proxy": {
        "httpProxy": PROXY,
        "httpsProxy": PROXY,
        "noProxy": ".corp",
    },
    "podSecurityContext": {"runAsUser": 20001, "runAsGroup": 20001},
    "storage": {"fsGroup": 20001},
    "operator": {"replicas": 2, "priorityClassName": "system-cluster-critical"},
    "bot": {
        "replicas": 2,
        "priorityClassName": "doppel-serving",
        "extraEnv": [{"name": "TZ", "value": "Europe/Paris"}],
    },
    "vllm": {
        "replicas": 2,
        "priorityClassName": "doppel-serving",
        "podSecurityContext": {"supplementalGroups": [4242]},
    },
    "jobs": {
        "ttlSecondsAfterFinished": 900,
        "priorityClassName": "doppel-batch",
        "podSecurityContext": {"supplementalGroups": [4242]},
        "extraEnv": [{"name": "PIP_INDEX_URL", "value": "https://pypi.corp/simple"}],
        "cpu": {"nodeSelector": {"pool": "cpu"}},
        "train": {"priorityClassName": "doppel-training"},
    },
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "bot_ingress": None,
}
del ADMIN_VALUES["bot_ingress"]
VALUE_SETS: dict[str, tuple[list[Any], dict[str, Any]]] = {
    "default": ([], {}),
    "scaled": ([SCALED_VALUES], OAUTH),
    "admin": ([], ADMIN_VALUES),
    # The e2e suite's values for kind/k3s (tests/e2e): checked here, where no cluster is needed.
    "kind": ([CHART_DIR.parents[1] / "tests" / "e2e" / "values-kind.yaml"], {}),
    "no-proxy-socket": ([], {"vllm": {"chatProxy": {"enabled": False}}, "bot": {"mode": "socket"},
                             "slack": {"appToken": "xapp-1"}, "metrics": {"enabled": False}}),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    files, values = VALUE_SETS[request.param]
    return request.param, render_chart(files, values)


def job_config(manifests: list[dict[str, Any]]) -> OperatorConfig:
    """The configuration `doppel operator` builds from the chart's environment (as in the pod)."""
    env = rendered_env(manifests, "operator")
    command = main.commands["operator"]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return operator_config(**command.make_context("operator", []).params)


def operator_jobs(config: OperatorConfig) -> dict[str, dict[str, Any]]:
    """One Job of every step, as the operator creates them for the example DoppelUser."""
    example = yaml.safe_load(EXAMPLE_DOPPELUSER.read_text(encoding="utf-8"))
    spec = DoppelUserSpec.model_validate(example["spec"])
    owner = jobs.Owner("doppel", example["metadata"]["name"], "0f3c9a1e-uid", 3)
    commands = {
        "scrape": jobs.scrape_command(spec, config, owner),
        "train": jobs.train_command(spec, config, owner),
        "cleanup": jobs.cleanup_command(config, ["/data/x"]),
        "purge": jobs.cleanup_command(config, ["/data/x"]),
        "prune": jobs.cleanup_command(config, ["/data/x"]),
    }
    return {
        step: jobs.job_manifest(owner, step, 1, command, spec, config)  # type: ignore[arg-type]
        for step, command in commands.items()
    }


def test_every_rendered_pod_is_restricted_with_requests_and_memory_limits(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    which, manifests = rendered
    pods = pod_specs(manifests)
    assert {where.split("/")[0] for where, _ in pods} == {"Deployment"} and len(pods) == 3, which
    for where, pod in pods:
        assert restricted_violations(pod) == [], f"{which}: {where}"
        assert resource_violations(pod) == [], f"{which}: {where}"
        assert qos_class(pod) == "Burstable"


def test_every_job_pod_the_operator_creates_is_restricted_and_valid(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """scrape, train, cleanup, purge and prune Jobs, built by the operator from the chart's settings."""
    which, manifests = rendered
    config = job_config(manifests)
    for step, job in operator_jobs(config).items():
        for version in ("1.33.0", "1.35.0"):
            kubernetes_validate.validate(job, version, strict=True)
        pod = job["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [], f"{which}: {step}"
        assert resource_violations(pod) == [], f"{which}: {step}"
        (container,) = pod["containers"]
        resources = container["resources"]
        assert qos_class(pod) == "Burstable", step  # never BestEffort, the first a node evicts
        if step == "train":  # the memory it asked for (the chart's train defaults) is the memory it may use
            expected = "4Gi" if which == "kind" else "16Gi"
            assert resources["limits"]["memory"] == resources["requests"]["memory"] == expected
        # Set by the operator once it has recorded the Job's outcome, not at creation.
        assert "ttlSecondsAfterFinished" not in job["spec"]
        assert config.jobs.ttl_seconds_after_finished == {"admin": 900, "scaled": 600}.get(which, 3600)
        image = container["image"]
        if step == "train":
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert "doppel-worker:" in image and gpus == (None if which == "kind" else "1")
        else:
            # The small CPU image: no GPU, no CUDA download for a scrape.
            assert "doppel-worker-cpu" in image and "nvidia.com/gpu" not in resources["limits"]
        if which == "admin":
            assert pod["securityContext"]["runAsUser"] == 20001
            assert pod["securityContext"]["fsGroup"] == 20001
            assert pod["securityContext"]["supplementalGroups"] == [4242]
            assert pod["priorityClassName"] == ("doppel-training" if step == "train" else "doppel-batch")
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HTTPS_PROXY"] == PROXY
            assert env["PIP_INDEX_URL"] == "https://pypi.corp/simple"
            assert ".svc" in env["NO_PROXY"] and ".corp" in env["NO_PROXY"]
            if step != "train":
                assert image.endswith("@" + DIGEST) and pod["nodeSelector"] == {"pool": "cpu"}


def test_the_checks_catch_what_admission_would_refuse() -> None:
    """Not vacuous: each classic mistake is reported."""
    manifests = render_chart()
    vllm = find_manifest(manifests, "Deployment", "vllm")["spec"]["template"]["spec"]
    assert restricted_violations(vllm) == []
    mistakes = {
        "runAsNonRoot": lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
        "allowPrivilegeEscalation": lambda p: p["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "drop ALL": lambda p: p["initContainers"][0]["securityContext"]["capabilities"].update(
            drop=["NET_RAW"]
        ),
        "seccompProfile": lambda p: [
            p["securityContext"].pop("seccompProfile"),
            p["containers"][0]["securityContext"].pop("seccompProfile"),
        ],
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "runAsUser 0": lambda p: p["containers"][1]["securityContext"].update(runAsUser=0),
    }  # fmt: skip
    for needle, mistake in mistakes.items():
        pod = copy.deepcopy(vllm)
        mistake(pod)
        assert any(needle in v for v in restricted_violations(pod)), needle
    pod = copy.deepcopy(vllm)
    del pod["containers"][1]["resources"]["limits"]
    assert resource_violations(pod) == ["container chat-proxy: no memory limit"]
    assert qos_class({"containers": [{"name": "x"}]}) == "BestEffort"


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_pdbs_exist_for_multi_replica_components_and_select_only_them() -> None:
    assert not find_manifests(render_chart(), "PodDisruptionBudget"), "one replica: a budget blocks drains"
    # KEDA or an HPA own the vLLM pods' number (vllm.replicas unused): up to maxReplicas of them to drain.
    for scaler in ("keda", "hpa"):
        scaled = {"minReplicas": 1, "maxReplicas": 3, scaler: {"enabled": True, "assumeInstalled": True}}
        if scaler == "hpa":
            del scaled[scaler]["assumeInstalled"]
        manifests = render_chart(set_values={"vllm": {"replicas": 1, "autoscaling": scaled}})
        (pdb,) = find_manifests(manifests, "PodDisruptionBudget")
        assert pdb["metadata"]["name"].endswith("-vllm") and pdb["spec"]["maxUnavailable"] == 1
        scaled["maxReplicas"] = 1
        manifests = render_chart(set_values={"vllm": {"replicas": 3, "autoscaling": scaled}})
        assert not find_manifests(manifests, "PodDisruptionBudget"), f"{scaler}: at most one vLLM pod"
    manifests = render_chart([SCALED_VALUES], OAUTH)
    pdbs = find_manifests(manifests, "PodDisruptionBudget")
    deployments = {d["metadata"]["name"]: d for d in find_manifests(manifests, "Deployment")}
    assert {p["metadata"]["name"] for p in pdbs} == set(deployments)
    for pdb in pdbs:
        assert pdb["spec"]["maxUnavailable"] == 1
        for name, deployment in deployments.items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert _selects(pdb["spec"]["selector"]["matchLabels"], labels) == (
                name == pdb["metadata"]["name"]
            )


def test_selectors_are_scoped_to_the_release() -> None:
    """Two releases in one namespace: no selector of one matches a pod of the other, and the operator's
    default vLLM selector finds its own release's vLLM pods only."""
    one = render_chart()
    instance = '"app.kubernetes.io/instance": '
    other = json.loads(json.dumps(one).replace(instance + '"doppel"', instance + '"other"'))
    other_pods = [d["spec"]["template"]["metadata"]["labels"] for d in find_manifests(other, "Deployment")]
    selectors = [d["spec"]["selector"]["matchLabels"] for d in find_manifests(one, "Deployment")]
    selectors += [s["spec"]["selector"] for s in find_manifests(one, "Service")]
    selectors += [n["spec"]["podSelector"]["matchLabels"] for n in find_manifests(one, "NetworkPolicy")]
    for selector in selectors:
        assert selector.get("app.kubernetes.io/instance") == "doppel", selector
        assert not any(_selects(selector, labels) for labels in other_pods)
    config = job_config(one)
    example = DoppelUserSpec.model_validate(yaml.safe_load(EXAMPLE_DOPPELUSER.read_text())["spec"])
    spec = with_vllm_selector(example, config.vllm_selector)
    vllm_pods = find_manifest(one, "Deployment", "vllm")["spec"]["template"]["metadata"]["labels"]
    assert _selects(spec.vllm.selector, vllm_pods)
    assert not any(_selects(spec.vllm.selector, labels) for labels in other_pods)
    # A DoppelUser that names its own selector keeps it.
    own = DoppelUserSpec.model_validate({**spec.model_dump(by_alias=True), "vllm": {"selector": {"a": "b"}}})
    assert with_vllm_selector(own, config.vllm_selector).vllm.selector == {"a": "b"}


def test_rbac_has_no_wildcards_and_cluster_roles_only_read() -> None:
    manifests = render_chart([SCALED_VALUES], OAUTH)
    for role in [*find_manifests(manifests, "Role"), *find_manifests(manifests, "ClusterRole")]:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["metadata"]["name"], rule)
            if role["kind"] == "ClusterRole":
                assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    # Nobody may list or watch Secrets: a Secret is read by name only.
    for role in find_manifests(manifests, "Role"):
        for rule in role["rules"]:
            if "secrets" in rule["resources"]:
                assert not {"list", "watch"} & set(rule["verbs"]), rule


def test_operator_liveness_probe_calls_the_endpoint_kopf_serves() -> None:
    manifests = render_chart()
    operator = find_manifest(manifests, "Deployment", "operator")
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    probe = container["livenessProbe"]["httpGet"]
    (port,) = [p for p in container["ports"] if p["name"] == probe["port"]]
    assert job_config(manifests).liveness_endpoint == f"http://0.0.0.0:{port['containerPort']}{probe['path']}"


@pytest.mark.parametrize(
    ("replicas", "strategy"),
    [(1, {"maxSurge": 1, "maxUnavailable": 0}), (3, {"maxSurge": 0, "maxUnavailable": 1})],
)
def test_vllm_keeps_serving_through_an_update(replicas: int, strategy: dict[str, int]) -> None:
    vllm = find_manifest(render_chart(set_values={"vllm": {"replicas": replicas}}), "Deployment", "vllm")
    assert vllm["spec"]["strategy"]["rollingUpdate"] == strategy


def test_proxy_and_extra_env_reach_the_components_that_call_out() -> None:
    manifests = render_chart(set_values=ADMIN_VALUES)

    def env(component: str) -> dict[str, Any]:
        deployment = find_manifest(manifests, "Deployment", component)
        (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == component]
        return {e["name"]: e.get("value") for e in c.get("env", [])}

    for component in ("bot", "vllm"):
        assert env(component)["HTTPS_PROXY"] == env(component)["https_proxy"] == PROXY
        no_proxy = env(component)["NO_PROXY"].split(",")
        assert {".svc", "kubernetes.default.svc", "doppel-vllm", ".corp"} <= set(no_proxy)
    assert "HTTPS_PROXY" not in env("operator")  # it talks to the API server and pod IPs only
    assert env("bot")["TZ"] == "Europe/Paris"
    for component in ("operator", "bot", "vllm"):
        pod = find_manifest(manifests, "Deployment", component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 20001
        assert pod.get("priorityClassName") == {"operator": "system-cluster-critical"}.get(
            component, "doppel-serving"
        )
    assert (
        find_manifest(manifests, "Deployment", "bot")["spec"]["template"]["spec"]["containers"][0]["image"]
        == f"ghcr.io/doppel-dev/doppel@{DIGEST}"
    )


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"images": {"app": {"digest": "latest"}}}, "/images/app/digest"),
        ({"jobs": {"ttlSecondsAfterFinished": -1}}, "/jobs/ttlSecondsAfterFinished"),
        # Gone before the operator saw how it ended: a failed attempt would not count, a success would rerun.
        ({"jobs": {"ttlSecondsAfterFinished": 0}}, "/jobs/ttlSecondsAfterFinished"),
        ({"bot": {"podSecurityContext": {"runAsUsr": 1}}}, "/bot/podSecurityContext"),
        ({"vllm": {"extraEnv": [{"value": "x"}]}}, "/vllm/extraEnv/0"),
        ({"jobs": {"cpu": {"resources": {"limits": {"memory": None}}}}}, "/jobs/cpu/resources/limits"),
        ({"operator": {"resources": {"requests": {"cpu": None}}}}, "/operator/resources/requests"),
    ],
)  # fmt: skip
def test_wrong_admin_values_are_refused(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError) as caught:
        template_chart(set_values=values)
    assert complaint in str(caught.value)


def test_notes_say_what_was_installed() -> None:
    out = helm(
        "install", "doppel", str(CHART_DIR), "--dry-run=client", "--namespace", "team-a",
        "-f", str(SCALED_VALUES), "--set", "slack.signingSecret=s", "--set-string", "slack.clientId=1",
        "--set", "slack.clientSecret=c", "--set", "slack.botToken=",
    )  # fmt: skip
    notes = out[out.index("NOTES:") :]
    for line in (
        "Deployment doppel-operator  2 replica(s), registry.example.com/doppel/doppel:0.1.0",
        "Deployment doppel-vllm      4 replica(s), vllm/vllm-openai:v0.32.0, serving Qwen/Qwen2.5-7B",
        "PersistentVolumeClaim doppel-data  500Gi ReadWriteMany",
        "PodDisruptionBudget doppel-bot",
        "deleted 600s after they finish",
        'Pod Security "restricted"',
    ):
        assert line in notes, line


@pytest.mark.parametrize("version", ["1.29.0", "1.32.4"])
def test_the_chart_refuses_a_cluster_without_ordered_namespace_deletion(version: str) -> None:
    """Before 1.33 a namespace's objects go in no set order: the operator's Role can go before the
    DoppelUsers it must release, and the namespace would hang (docs/operator.md). Helm says so at install."""
    with pytest.raises(HelmError) as caught:
        template_chart(extra_args=["--kube-version", version])
    assert ">=1.33.0-0" in str(caught.value) and version in str(caught.value)
    template_chart(extra_args=["--kube-version", "1.33.0"])
