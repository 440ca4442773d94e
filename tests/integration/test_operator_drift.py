"""Drift checks cost O(pods), not O(DoppelUsers x pods): one `/v1/models` listing per vLLM pod per resync
interval, whatever the number of doppels; a pod that restarts gets every adapter back within an interval.

The real operator under kopf against kmock; 40 Ready DoppelUsers and 3 vLLM pods. The pods are
`AdapterApiPod`s (tests/support/vllm_pods.py): loopback servers speaking vLLM's adapter API and counting
the requests they get, since three real vLLM CPU servers would not fit this machine beside the suite. What
vLLM itself does with adapters is tested on the real server (test_operator_vllm.py, test_vllm_capacity.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from tests.support.kube_fixtures import NAMESPACE, OperatorProcess, config_with, vllm_pod
from tests.support.metrics import free_port
from tests.support.vllm_pods import AdapterApiPod

from doppel.operator.handlers import RESYNC_JITTER

USERS, PODS = 40, 3
INTERVAL_S = 5.0  # wide enough that a loaded CI machine keeps each check within its interval
LIST, LOAD = "GET /v1/models", "POST /v1/load_lora_adapter"


def ready_doppeluser(i: int) -> dict:
    """A DoppelUser as the operator leaves it once Ready: its adapter registered, version 1."""
    return {
        "apiVersion": "doppel.dev/v1alpha1",
        "kind": "DoppelUser",
        "metadata": {"name": f"user-{i:03d}", "namespace": NAMESPACE},
        "spec": {
            "slack": {"teamId": "T0ACME001", "tokenSecretRef": {"name": "slack-bot", "key": "token"}},
            "target": {"handle": f"user{i}"},
            "baseModel": {"servedName": "doppel-tiny", "path": "/models/tiny"},
        },
        "status": {
            "phase": "Ready",
            "observedGeneration": 1,
            "adapter": {
                "servedName": f"user-{i:03d}-v1",
                "path": f"/data/adapters/user-{i:03d}/v1",
                "version": 1,
            },
        },
    }


@pytest.fixture
async def pods(kube) -> AsyncIterator[list[AdapterApiPod]]:
    started = [AdapterApiPod().start() for _ in range(PODS)]
    for n, pod in enumerate(started):
        await kube.kubectl.create(vllm_pod(f"vllm-{n}", pod.port))
    await kube.kubectl.secret("slack-bot", {"token": "xoxb-test"})
    for i in range(USERS):
        await kube.kubectl.create(ready_doppeluser(i))
    yield started
    for pod in started:
        pod.stop()


async def all_loaded(pods: list[AdapterApiPod], timeout: float = 60.0) -> float:
    """Seconds until every pod holds every user's adapter."""
    names = {f"user-{i:03d}-v1" for i in range(USERS)}
    started = time.monotonic()
    while not all(names <= set(pod.loaded) for pod in pods):
        assert time.monotonic() - started < timeout, [len(pod.loaded) for pod in pods]
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_drift_checks_list_each_pod_once_per_interval(kube, operator_config, pods):
    operator = OperatorProcess(config_with(operator_config, resync_s=INTERVAL_S))
    await operator.start()
    try:
        took = await all_loaded(pods)
        # Started together, 40 loops checked 3 pods: one listing per pod per interval, shared (not 40).
        assert all(1 <= pod.count(LIST) <= 1 + took // INTERVAL_S for pod in pods), (took, pods[0].requests)
        assert [pod.count(LOAD) for pod in pods] == [USERS] * PODS

        for pod in pods:
            pod.reset_counts()
        window = time.monotonic()
        await asyncio.sleep(5 * INTERVAL_S)
        # (timed: on a loaded machine the sleep can last much longer than asked)
        intervals = (time.monotonic() - window) / INTERVAL_S
        listings = [pod.count(LIST) for pod in pods]
        # At most one per interval, plus one for the window's edges (the old scheme: 40 per interval).
        assert all(1 <= n <= intervals + 1 for n in listings), (listings, intervals)
        assert sum(pod.count(LOAD) for pod in pods) == 0  # nothing drifted, nothing loaded
        requests = sum(sum(pod.requests.values()) for pod in pods)
        assert requests <= PODS * (intervals + 1)

        # vLLM on pod 1 restarts: its runtime-loaded adapters are gone; the kubelet shows the pod unready,
        # then ready again.
        pods[1].restart()
        await kube.kubectl.patch_status(
            "Pod", "vllm-1", {"conditions": [{"type": "Ready", "status": "False"}]}
        )
        await asyncio.sleep(0.5)
        await kube.kubectl.patch_status(
            "Pod", "vllm-1", {"conditions": [{"type": "Ready", "status": "True"}]}
        )
        back = await all_loaded(pods)
        # Within one (jittered) interval of the loops, plus the 0.5 s the pod spent not ready.
        within = INTERVAL_S * (1 + RESYNC_JITTER) + 0.5
        assert back < within, f"the restarted pod got its adapters back after {back:.1f} s (> {within:.1f} s)"
        assert pods[1].count(LOAD) == USERS and pods[0].count(LOAD) == pods[2].count(LOAD) == 0
    finally:
        await operator.stop()


async def test_an_operator_restart_lists_each_pod_once_not_once_per_doppel(kube, operator_config, pods):
    config = config_with(operator_config, resync_s=INTERVAL_S)
    operator = OperatorProcess(config)
    await operator.start()
    await all_loaded(pods)
    await operator.stop()
    for pod in pods:
        pod.reset_counts()
    # Every loop starts again at once and checks every pod straight away.
    config = config_with(config, metrics_port=free_port())
    operator = OperatorProcess(config)
    await operator.start()
    try:
        started = time.monotonic()
        while await reconcile_passes(config.metrics_port) < USERS:  # each loop's first pass
            assert time.monotonic() - started < 60, "the loops did not all run"
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        listings = [pod.count(LIST) for pod in pods]
        # One listing per pod for the 40 first passes (more only if they took longer than an interval).
        assert all(1 <= n <= 1 + elapsed // INTERVAL_S for n in listings), (listings, elapsed)
        assert sum(pod.count(LOAD) for pod in pods) == 0
    finally:
        await operator.stop()


async def reconcile_passes(port: int) -> float:
    """Reconcile passes the operator finished, from its /metrics (0 before it serves them)."""
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    except httpx.TransportError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("doppel_reconcile_duration_seconds_count "):
            return float(line.split()[1])
    return 0.0
