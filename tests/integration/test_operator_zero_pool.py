"""A vLLM pool scaled to zero (vllm.autoscaling.keda, minReplicas 0) and an adapter trained meanwhile.

The bot wakes the pool only for doppels that have an adapter (`status.adapter`), so a first adapter that
waited for a ready vLLM pod would wait forever. With no pod at all and vLLM's filesystem LoRA resolver on
(the chart's `--lora-dir`), the operator serves it at once (Ready, reason PoolAsleep) and loads it on the
pods that start. The real operator under kopf against kmock; the vLLM pod is an `AdapterApiPod`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tests.integration.test_operator_conditions import cond, reason
from tests.integration.test_operator_drift import ready_doppeluser
from tests.support.kube_fixtures import OperatorProcess, config_with, vllm_pod
from tests.support.vllm_pods import AdapterApiPod


def registering_doppeluser(name: str) -> dict:
    """A DoppelUser as the operator leaves it once its first train Job succeeded: v1 to register."""
    obj = ready_doppeluser(0)
    obj["metadata"]["name"] = name
    adapter = {"servedName": f"{name}-v1", "path": f"/data/adapters/{name}/v1", "version": 1}
    obj["status"] = {"phase": "Registering", "observedGeneration": 1, "pendingAdapter": adapter}
    return obj


@pytest.fixture
async def pod() -> AsyncIterator[AdapterApiPod]:
    started = AdapterApiPod().start()
    yield started
    started.stop()


async def test_a_first_adapter_serves_while_the_pool_sleeps_and_loads_when_a_pod_starts(
    kube, operator_config, pod
):
    await kube.kubectl.secret("slack-bot", {"token": "xoxb-test"})
    operator = OperatorProcess(config_with(operator_config, lora_dir=operator_config.data_root + "/lora"))
    await operator.start()
    try:
        await kube.kubectl.create(registering_doppeluser("alice"))
        obj = await kube.wait_for("alice", lambda o: o["status"].get("phase") == "Ready", 30, "Ready")
        # The bot sees an adapter to ask for (and so wakes the pool); the status says why no pod has it.
        assert obj["status"]["adapter"]["servedName"] == "alice-v1" and "pendingAdapter" not in obj["status"]
        assert reason(obj) == "PoolAsleep" and obj["status"].get("servedBy", []) == []
        assert cond(obj, "Ready")["status"] == "True" and cond(obj, "Ready")["reason"] == "PoolAsleep"
        assert cond(obj, "Registered")["reason"] == "PoolAsleep"

        # A mention woke the pool: the pod that starts gets the adapter, and the status says it serves.
        await kube.kubectl.create(vllm_pod("vllm-0", pod.port))
        obj = await kube.wait_for(
            "alice", lambda o: o["status"].get("servedBy") == ["vllm-0"], 30, "served by the new pod"
        )
        assert "alice-v1" in pod.loaded and reason(obj) is None
        assert cond(obj, "Ready")["reason"] == "Serving"
    finally:
        await operator.stop()


async def test_a_waking_pool_or_no_resolver_keeps_the_adapter_registering(kube, operator_config, pod):
    """A pool with a pod on its way (not ready yet) is not asleep: registration waits for the pod, as
    before; so does an operator without the resolver's directory (nothing could load it by name)."""
    await kube.kubectl.secret("slack-bot", {"token": "xoxb-test"})
    await kube.kubectl.create(vllm_pod("vllm-0", pod.port, ready=False))
    operator = OperatorProcess(config_with(operator_config, lora_dir=operator_config.data_root + "/lora"))
    await operator.start()
    try:
        await kube.kubectl.create(registering_doppeluser("alice"))
        obj = await kube.wait_for("alice", lambda o: reason(o) == "NoVllmPods", 30, "NoVllmPods")
        assert obj["status"]["phase"] == "Registering" and "adapter" not in obj["status"]
    finally:
        await operator.stop()
    await kube.kubectl.delete("Pod", "vllm-0")
    operator = OperatorProcess(operator_config)  # no --lora-dir
    await operator.start()
    try:
        await kube.kubectl.create(registering_doppeluser("bob"))
        obj = await kube.wait_for("bob", lambda o: reason(o) == "NoVllmPods", 30, "NoVllmPods")
        assert obj["status"]["phase"] == "Registering" and "adapter" not in obj["status"]
    finally:
        await operator.stop()
