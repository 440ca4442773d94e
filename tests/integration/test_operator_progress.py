"""Training progress, step by step, in the DoppelUser status while the train Job runs.

The real operator under kopf against kmock; the train Job is the real `doppel train --json-progress` on the
tiny model, run as a local process whose output kmock serves on the pod's `log` subresource. The process is
frozen mid-training (as a slow GPU looks from outside) so the test can read the status, as `kubectl get
doppel -o yaml` would, at known points. No vLLM: the object stops at Registering, never Ready.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.integration.test_operator_conditions import doppeluser
from tests.support.kube_fixtures import Kube, OperatorProcess, config_with
from tests.support.slack_fixtures import ACME_TOKEN


def logged_steps(log: str) -> list[int]:
    """Steps of the progress lines a user would see in `kubectl logs` of the train pod."""
    steps = []
    for line in log.splitlines():
        if line.startswith('{"event": "progress"'):
            steps.append(json.loads(line)["step"])
    return steps


def training(obj: dict[str, Any]) -> dict[str, Any]:
    return (obj.get("status") or {}).get("training") or {}


def train_log(kube: Kube) -> str:
    run = next(r for name, r in kube.jobs.runs.items() if "-train-" in name)
    assert run.log is not None
    return run.log.read_text()


async def test_status_shows_training_progress_step_by_step(kube, operator_config, slack_emulator, tiny_model):
    config = config_with(
        operator_config,
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "1000"),
        progress_s=0.2,
    )
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    first = kube.jobs.pause_when("train", lambda log: len(logged_steps(log)) >= 1)
    operator = OperatorProcess(config)
    await operator.start()
    try:
        training_spec = {"rank": 8, "alpha": 16, "epochs": 2, "maxSteps": 3, "minSamples": 3, "batchSize": 1}
        manifest = doppeluser("alice", baseModel={"servedName": "doppel-tiny", "path": str(tiny_model)})
        manifest["spec"]["training"] = training_spec
        await kube.kubectl.create(manifest)
        await asyncio.wait_for(first.reached.wait(), 300)

        # Frozen after its first step(s): the status shows exactly what the log shows, while Training.
        at_first = logged_steps(train_log(kube))[-1]
        obj = await kube.wait_for("alice", lambda o: training(o).get("step") == at_first, 30, "first steps")
        seen = training(obj)
        assert obj["status"]["phase"] == "Training"
        assert at_first >= 1 and seen["totalSteps"] > at_first
        assert seen["percent"] == round(100 * at_first / seen["totalSteps"], 1)
        assert isinstance(seen["loss"], float) and seen["epoch"] > 0 and seen["updatedAt"]

        # Nothing new in the log: the status is not patched again (updatedAt stays).
        await asyncio.sleep(1.0)
        assert training(await kube.kubectl.get("DoppelUser", "alice")) == seen

        # One more step: the status follows.
        second = kube.jobs.pause_when("train", lambda log: max(logged_steps(log), default=0) > at_first)
        first.resume()
        await asyncio.wait_for(second.reached.wait(), 120)
        at_second = logged_steps(train_log(kube))[-1]
        obj = await kube.wait_for("alice", lambda o: training(o).get("step") == at_second, 30, "more steps")
        assert obj["status"]["phase"] == "Training"
        assert training(obj)["percent"] > seen["percent"]
        assert training(obj)["updatedAt"] >= seen["updatedAt"]

        # Done: the final figures come from the termination message, and training is complete.
        second.resume()
        obj = await kube.wait_for("alice", lambda o: o["status"]["phase"] == "Registering", 300, "trained")
        final = training(obj)
        assert final["step"] == final["totalSteps"] >= at_second and final["percent"] == 100
        assert Path(obj["status"]["pendingAdapter"]["path"]).is_dir()
    finally:
        first.resume()
        await operator.stop()
