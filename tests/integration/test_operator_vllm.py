"""The whole path under the operator: DoppelUser -> scrape Job -> train Job -> adapter answering on real vLLM.

kopf runs the real operator against kmock; Jobs run as local processes (real `doppel scrape` against the
Slack emulator, real `doppel train` on the tiny model); a real vLLM CPU server plays the vLLM pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.kube_fixtures import NAMESPACE, OperatorProcess, config_with, vllm_pod
from tests.support.metrics import scrape, value
from tests.support.slack_fixtures import ACME_TOKEN
from tests.support.vllm_fixtures import VllmServer, free_port, vllm_python

from doppel.api import ANNOTATION_DEACTIVATED
from doppel.operator import jobs

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def shared_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data root the Jobs and this module's vLLM share, as the chart mounts it in both."""
    return tmp_path_factory.mktemp("volume")


@pytest.fixture(scope="module")
def vllm(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, shared_volume: Path
) -> Iterator[VllmServer]:
    """One real vLLM server for this module, restarted by the tests (so not the session-wide one). Like
    the chart's, it resolves adapters it has not loaded from the volume's lora/ directory by name."""
    (shared_volume / "lora").mkdir()  # as the chart's init container does: vLLM needs it to exist
    resolver = {
        "VLLM_PLUGINS": "lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(shared_volume / "lora"),
    }
    server = VllmServer(
        tiny_model, tmp_path_factory.mktemp("vllm-op") / "vllm.log", python=vllm_python(), extra_env=resolver
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def doppeluser(tiny_model: Path, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "doppel.dev/v1alpha1",
        "kind": "DoppelUser",
        "metadata": {"name": "alice", "namespace": NAMESPACE},
        "spec": {
            "slack": {"teamId": "T0ACME001", "tokenSecretRef": {"name": "slack-bot", "key": "token"}},
            "target": {"handle": "alice"},
            "data": {"minLength": 20},
            "baseModel": {"servedName": "doppel-tiny", "path": str(tiny_model)},
            "training": {"rank": 8, "alpha": 16, "epochs": 1, "maxSteps": 2, "minSamples": 3, **training},
            "resources": {"gpu": 0},
        },
    }


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def ready_with(version: int):
    def check(obj: dict[str, Any]) -> bool:
        st = status(obj)
        return st.get("phase") == "Ready" and (st.get("adapter") or {}).get("version") == version

    return check


async def served(server: VllmServer) -> set[str]:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(f"{server.base_url}/v1/models")
        response.raise_for_status()
        return {card["id"] for card in response.json()["data"]}


async def until_served(server: VllmServer, name: str, present: bool = True, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if (name in await served(server)) == present:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(
        f"{name} {'never appeared on' if present else 'still on'} vLLM: {await served(server)}"
    )


async def test_doppeluser_lifecycle_on_real_vllm(
    kube, operator_config, slack_emulator, tiny_model, vllm, shared_volume
):
    metrics_port = free_port()
    config = config_with(
        operator_config,
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "1000"),
        data_root=str(shared_volume),
        lora_dir=str(shared_volume / "lora"),
        metrics_port=metrics_port,
    )
    data_root = Path(config.data_root)
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    # The vLLM pod first names a port nothing listens on: registration must say so, then heal.
    await kube.kubectl.create(vllm_pod("vllm-0", free_port()))
    operator = OperatorProcess(config)
    await operator.start()
    try:
        # 1. Create -> Ready, the adapter answering on vLLM under the name in the status.
        await kube.kubectl.create(doppeluser(tiny_model))
        obj = await kube.wait_for("alice", lambda o: status(o).get("reason") == "VllmUnreachable", 300)
        assert status(obj)["phase"] == "Registering" and "adapter" not in status(obj)
        assert "vllm-0" in next(c for c in status(obj)["conditions"] if c["type"] == "Registered")["message"]
        await kube.kubectl.patch("Pod", "vllm-0", {"spec": vllm_pod("vllm-0", vllm.port)["spec"]})
        obj = await kube.wait_for("alice", ready_with(1), 60, "Ready v1")
        adapter = status(obj)["adapter"]
        assert adapter["servedName"] == "team.alice.v1"
        assert status(obj)["servedBy"] == ["vllm-0"] and status(obj)["samples"] >= 3
        conditions = {c["type"]: c["status"] for c in status(obj)["conditions"]}
        assert conditions == {"Scraped": "True", "Trained": "True", "Registered": "True", "Ready": "True"}
        assert (Path(adapter["path"]) / "adapter_config.json").is_file()
        async with httpx.AsyncClient(timeout=120) as http:
            reply = await http.post(
                f"{vllm.base_url}/v1/chat/completions",
                json={
                    "model": adapter["servedName"],
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 8,
                },
            )
        assert reply.status_code == 200 and reply.json()["model"] == adapter["servedName"]
        # Raw data is deleted after training by default (a cleanup Job); the adapter stays.
        deadline = asyncio.get_running_loop().time() + 60
        while (
            data_root / NAMESPACE / "alice" / "g1"
        ).exists() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.3)
        assert not (data_root / NAMESPACE / "alice" / "g1").exists()
        phases = {"Scraping", "Training", "Registering", "Ready"}
        events = await kube.wait_for_events(lambda found: phases <= {e["reason"] for e in found})
        assert phases <= {e["reason"] for e in events}

        # 2. The vLLM pod restarts and loses its adapters. Before the operator has done anything (the pod
        # is not even Ready to it), a mention routed there is answered: vLLM finds the adapter on the
        # volume by its name. Then the operator sees it held already, without touching the object.
        await kube.kubectl.patch_status(
            "Pod", "vllm-0", {"conditions": [{"type": "Ready", "status": "False"}]}
        )
        await asyncio.to_thread(vllm.restart)
        assert "team.alice.v1" not in await served(vllm)
        async with httpx.AsyncClient(timeout=120) as http:
            reply = await http.post(
                f"{vllm.base_url}/v1/chat/completions",
                json={
                    "model": "team.alice.v1",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 8,
                },
            )
        assert reply.status_code == 200, reply.text
        assert "team.alice.v1" in await served(vllm)
        await kube.kubectl.patch_status(
            "Pod", "vllm-0", {"conditions": [{"type": "Ready", "status": "True"}]}
        )
        await until_served(vllm, "team.alice.v1", timeout=30)
        assert (await kube.kubectl.get("DoppelUser", "alice"))["metadata"]["generation"] == 1
        # 3. An adapter the pod lost while nobody asked for it (vLLM lists only what it has loaded) is put
        # back by the periodic drift check, and counted as a repair.
        async with httpx.AsyncClient(timeout=60) as http:
            unload = await http.post(
                f"{vllm.base_url}/v1/unload_lora_adapter", json={"lora_name": "team.alice.v1"}
            )
        assert unload.status_code == 200, unload.text
        await until_served(vllm, "team.alice.v1", timeout=30)
        # /metrics tells the same story: one registration timed (the failed one is not), drift repaired.
        deadline = asyncio.get_running_loop().time() + 15
        samples = await scrape(metrics_port)
        while value(samples, "doppel_vllm_drift_repairs_total") < 1:
            assert asyncio.get_running_loop().time() < deadline, "the drift repair was not counted"
            await asyncio.sleep(0.3)
            samples = await scrape(metrics_port)
        assert value(samples, "doppel_adapter_registration_seconds_count") == 1
        assert value(samples, "doppel_vllm_drift_repairs_total") >= 1
        assert value(samples, "doppel_vllm_drift_detected_total") >= value(
            samples, "doppel_vllm_drift_repairs_total"
        )
        assert value(samples, "doppel_vllm_drift_pods", namespace=NAMESPACE) == 0
        assert value(samples, "doppel_doppelusers", namespace=NAMESPACE, phase="Ready") == 1
        assert value(samples, "doppel_stage_duration_seconds_count", stage="register") == 1

        # 3. A spec change retrains; the operator is killed mid-training and comes back.
        kube.jobs.hold("train")
        await kube.kubectl.patch("DoppelUser", "alice", {"spec": {"training": {"alpha": 32}}})
        obj = await kube.wait_for("alice", lambda o: status(o).get("phase") == "Training", 120, "training v2")
        assert status(obj)["adapter"]["version"] == 1  # the old adapter serves meanwhile
        await operator.kill()
        operator = OperatorProcess(config)
        await operator.start()
        kube.jobs.release("train")
        obj = await kube.wait_for("alice", ready_with(2), 300, "Ready v2")
        assert status(obj)["adapter"]["servedName"] == "team.alice.v2"
        g2_trains = [
            j
            for j in kube.cluster.jobs()
            if j["metadata"]["labels"][jobs.L_STEP] == "train"
            and j["metadata"]["labels"][jobs.L_GENERATION] == "2"
        ]
        assert len(g2_trains) == 1  # the restarted operator found its Job instead of starting another
        await until_served(vllm, "team.alice.v1", present=False, timeout=30)
        assert "team.alice.v2" in await served(vllm)

        # 4. Deletion: the finalizer unloads the adapter and removes the files, then the object goes.
        await kube.kubectl.delete("DoppelUser", "alice")
        deadline = asyncio.get_running_loop().time() + 90
        while await kube.kubectl.get("DoppelUser", "alice") is not None:
            assert asyncio.get_running_loop().time() < deadline, "finalizer never released the object"
            await asyncio.sleep(0.3)
        assert "team.alice.v2" not in await served(vllm)
        assert not (data_root / NAMESPACE / "alice").exists()
        assert not list((data_root / "lora").iterdir())  # no resolver name points at a removed adapter
    finally:
        kube.jobs.release("train")
        await operator.stop()


async def operator_on_vllm(kube: Any, operator_config: Any, slack_emulator: Any, vllm: VllmServer) -> Any:
    """The operator started, with the token Secret and the module's vLLM as the ready vLLM pod."""
    config = config_with(
        operator_config, slack_api_url=slack_emulator.base_url + "/", scrape_args=("--rate-scale", "1000")
    )
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    await kube.kubectl.create(vllm_pod("vllm-0", vllm.port))
    operator = OperatorProcess(config)
    await operator.start()
    return operator


async def test_retrain_schedule_retrains_and_swaps_the_adapter(
    kube, operator_config, slack_emulator, tiny_model, vllm
):
    operator = await operator_on_vllm(kube, operator_config, slack_emulator, vllm)
    try:
        scheduled = doppeluser(tiny_model)
        scheduled["metadata"]["name"] = "sched"
        scheduled["spec"]["retrainSchedule"] = "* * * * *"  # every minute
        await kube.kubectl.create(scheduled)
        obj = await kube.wait_for("sched", ready_with(1), 300, "Ready v1")
        # As a CronJob's status shows its next run: the next whole minute.
        upcoming = datetime.fromisoformat(status(obj)["nextScheduleTime"])
        assert upcoming.second == 0 and upcoming > datetime.fromisoformat(status(obj)["lastTrainedAt"])
        # At the next minute the operator asks for a retrain itself (a spec change, so a new generation).
        obj = await kube.wait_for("sched", ready_with(2), 300, "Ready v2 from the schedule")
        assert obj["spec"]["retrainRequestedAt"] and obj["metadata"]["generation"] == 2
        assert "team.sched.v2" in await served(vllm)  # loaded before the status switched to it
        await until_served(vllm, "team.sched.v1", present=False, timeout=30)
    finally:
        await operator.stop()
        async with httpx.AsyncClient(timeout=30) as http:
            for name in ("team.sched.v1", "team.sched.v2", "team.sched.v3"):
                await http.post(f"{vllm.base_url}/v1/unload_lora_adapter", json={"lora_name": name})


async def test_a_deactivated_persons_adapter_leaves_vllm_until_they_are_active_again(
    kube, operator_config, slack_emulator, tiny_model, vllm
):
    """The bot marks the person deactivated: the operator unloads the adapter from vLLM and keeps it off
    (no drift repair puts it back) until the mark goes; then it serves again."""
    operator = await operator_on_vllm(kube, operator_config, slack_emulator, vllm)

    def ready_is(value: str) -> Any:
        return lambda o: any(c["type"] == "Ready" and c["status"] == value for c in status(o)["conditions"])

    try:
        gone = doppeluser(tiny_model)
        gone["metadata"]["name"] = "gone"
        await kube.kubectl.create(gone)
        await kube.wait_for("gone", ready_with(1), 300, "Ready v1")
        await until_served(vllm, "team.gone.v1")
        marked = {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: "true"}}}
        await kube.kubectl.patch("DoppelUser", "gone", marked)
        obj = await kube.wait_for("gone", ready_is("False"), 30, "Ready False")
        assert status(obj)["reason"] == "Deactivated" and not status(obj).get("servedBy")
        await until_served(vllm, "team.gone.v1", present=False, timeout=30)
        await asyncio.sleep(3 * operator.config.resync_s)  # several passes, each repairing drift if active
        assert "team.gone.v1" not in await served(vllm)
        unmarked = {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: None}}}
        await kube.kubectl.patch("DoppelUser", "gone", unmarked)
        await kube.wait_for("gone", ready_is("True"), 60, "Ready again")
        await until_served(vllm, "team.gone.v1")
    finally:
        await operator.stop()
        async with httpx.AsyncClient(timeout=30) as http:
            await http.post(f"{vllm.base_url}/v1/unload_lora_adapter", json={"lora_name": "team.gone.v1"})
