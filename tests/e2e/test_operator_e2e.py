"""Opt-in end-to-end test on a real cluster: the Helm chart installed once, DoppelUsers trained and served.

Skipped unless KUBECONFIG is set. On a single-node kind or k3s cluster (Kubernetes 1.33+) without a GPU
(the values in tests/e2e/values-kind.yaml; any other cluster: your own values files in DOPPEL_E2E_VALUES,
separated by ":", e.g. tests/e2e/values-kind.yaml:images/built-values.yaml to pull the builds by digest):

    make images                        # podman/buildah/docker; tags localhost/doppel-dev/*:0.1.0
    kind create cluster --name doppel  # kind 0.27+ (or k3s v1.33+)
    for i in doppel doppel-worker doppel-worker-cpu; do
      podman save --format oci-archive --uncompressed -o /tmp/$i.tar localhost/doppel-dev/$i:0.1.0
      kind load image-archive /tmp/$i.tar --name doppel   # k3s: sudo k3s ctr images import /tmp/$i.tar
    done
    export KUBECONFIG=~/.kube/config
    export DOPPEL_E2E_SLACK_TOKEN=xoxb-...         # a bot token of a test workspace
    export DOPPEL_E2E_TEAM_ID=T0123ABC
    export DOPPEL_E2E_TARGET=alice                 # handle of a person with enough messages
    make tools && .venv/bin/python -m pytest tests/e2e -m e2e

The chart is installed once, into a fresh namespace (the model downloads once onto its volume); each test
uses DoppelUsers of its own. The last test deletes the namespace with a DoppelUser in it and checks that it
goes (a Terminating namespace must never hang on the operator's finalizer).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.support.helm import tool

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="KUBECONFIG not set: no cluster to test on"),
]

GROUP, VERSION, PLURAL = "doppel.dev", "v1alpha1", "doppelusers"
KIND_VALUES = Path(__file__).with_name("values-kind.yaml")
# The model the values serve (model.name, no servedName): what every DoppelUser here names.
MODEL = os.environ.get("DOPPEL_E2E_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")


def helm(*args: str, timeout: float) -> None:
    """The real helm against the cluster of $KUBECONFIG (tests.support.helm's runs offline)."""
    subprocess.run([str(tool("helm")), *args], check=True, timeout=timeout)


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"${name} is not set")
    return value


@pytest.fixture(scope="module")
def release() -> Any:
    """One install for the module (the model downloads once); the namespace goes at the end."""
    from kubernetes import client, config

    config.load_kube_config()
    namespace = f"doppel-e2e-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api().create_namespace({"metadata": {"name": namespace}})
    files = (os.environ.get("DOPPEL_E2E_VALUES") or str(KIND_VALUES)).split(os.pathsep)
    values = [arg for file in files for arg in ("-f", file)]
    # What the chart requires: the workspace served and a signing secret (the suite sends no events).
    values += ["--set", f"workspaces={{{env('DOPPEL_E2E_TEAM_ID')}}}", "--set", "slack.signingSecret=e2e"]
    values += ["--set", f"slack.botToken={env('DOPPEL_E2E_SLACK_TOKEN')}"]
    helm(
        "install",
        "doppel",
        "charts/doppel",
        "-n",
        namespace,
        "--wait",
        "--timeout",
        "10m",
        *values,
        timeout=700,
    )
    client.CoreV1Api().create_namespaced_secret(
        namespace, {"metadata": {"name": "slack-bot"}, "stringData": {"token": env("DOPPEL_E2E_SLACK_TOKEN")}}
    )
    try:
        yield namespace
    finally:
        # A test may have deleted the namespace itself.
        with contextlib.suppress(subprocess.CalledProcessError):
            helm("uninstall", "doppel", "-n", namespace, "--wait", timeout=300)
        with contextlib.suppress(client.ApiException):
            client.CoreV1Api().delete_namespace(namespace)


def doppeluser(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DoppelUser",
        "metadata": {"name": name},
        "spec": {
            "slack": {"teamId": env("DOPPEL_E2E_TEAM_ID"), "tokenSecretRef": {"name": "slack-bot"}},
            "target": {"handle": env("DOPPEL_E2E_TARGET")},
            "baseModel": {"servedName": MODEL, "path": MODEL},
            "training": {"rank": 8, "epochs": 1},
            **spec,
        },
    }


def wait_status(namespace: str, name: str, done: Any, timeout: float) -> dict[str, Any]:
    from kubernetes import client

    custom = client.CustomObjectsApi()
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = (
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        )
        if done(status):
            return status
        time.sleep(5)
    raise AssertionError(f"timed out; status: {status}")


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_rank_above_vllms_limit_fails_before_any_job(release: str) -> None:
    from kubernetes import client

    body = doppeluser("too-big")
    body["spec"]["training"]["rank"] = 256  # the chart's vLLM accepts at most vllm.maxLoraRank
    client.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, release, PLURAL, body)
    status = wait_status(release, "too-big", lambda s: s.get("phase") == "Failed", 120)
    assert status["reason"] == "RankTooHigh" and "--max-lora-rank" in status["message"]
    jobs = client.BatchV1Api().list_namespaced_job(release).items
    assert not [j for j in jobs if j.metadata.labels.get("doppel.dev/user") == "too-big"]


def test_unschedulable_train_pod_is_reported(release: str) -> None:
    from kubernetes import client

    body = doppeluser("nowhere", nodeSelector={"doppel.dev/e2e-no-such-node": "true"})
    client.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, release, PLURAL, body)
    status = wait_status(release, "nowhere", lambda s: s.get("reason") == "Unschedulable", 1800)
    assert "node" in condition(status, "Trained")["message"]  # the scheduler's own words
    client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, release, PLURAL, "nowhere")


def test_doppeluser_ready_and_served_on_a_real_cluster(release: str) -> None:
    from kubernetes import client
    from kubernetes.stream import stream

    namespace = release
    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doppeluser("e2e"))
    deadline = time.monotonic() + 3600
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = (
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "e2e").get("status") or {}
        )
        assert status.get("phase") != "Failed", status
        if status.get("phase") == "Ready":
            break
        time.sleep(10)
    assert status.get("phase") == "Ready", status
    served_name = status["adapter"]["servedName"]
    for pod_name in status["servedBy"]:
        models = stream(
            core.connect_get_namespaced_pod_exec,
            pod_name,
            namespace,
            container="vllm",
            command=[
                "python3",
                "-c",
                "import urllib.request;print(urllib.request.urlopen("
                "'http://127.0.0.1:8000/v1/models').read().decode())",
            ],
            stderr=True,
            stdout=True,
            stdin=False,
            tty=False,
        )
        assert served_name in models


def test_zz_deleting_the_namespace_with_a_doppeluser_never_hangs(release: str) -> None:
    """Last (pytest keeps file order; the name says so too): it takes the release's namespace with it."""
    from kubernetes import client

    client.CustomObjectsApi().create_namespaced_custom_object(
        GROUP, VERSION, release, PLURAL, doppeluser("leaving")
    )
    # Its finalizer is on once the operator has seen it (the phase says so): the case that could hang.
    wait_status(release, "leaving", lambda s: bool(s.get("phase")), 120)
    core = client.CoreV1Api()
    core.delete_namespace(release)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            core.read_namespace(release)
        except client.ApiException as exc:
            assert exc.status == 404
            return
        time.sleep(5)
    raise AssertionError(f"namespace {release} still Terminating after 10 minutes")
