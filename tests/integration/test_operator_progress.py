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
        # The step's own lines (its loss, then an evaluation at that step) may land in two patches.
        await asyncio.sleep(1.0)
        obj = await kube.kubectl.get("DoppelUser", "alice")
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


def scraping(obj: dict[str, Any]) -> dict[str, Any]:
    return (obj.get("status") or {}).get("scraping") or {}


def scrape_events(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"event": "scrape"')]


async def test_status_shows_scrape_progress(kube, operator_config, slack_emulator):
    # The client believes in a slower Slack than the emulator serves (5x, not 1000x), so that the scrape
    # lasts long enough to be frozen after its first channel.
    config = config_with(
        operator_config,
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "5"),
        progress_s=0.2,
    )
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    first = kube.jobs.pause_when("scrape", lambda log: any(e["channels_done"] for e in scrape_events(log)))
    operator = OperatorProcess(config)
    await operator.start()
    try:
        await kube.kubectl.create(
            doppeluser(
                "alice",
                slack={
                    "teamId": "T0ACME001",
                    "tokenSecretRef": {"name": "slack-bot"},
                    "rateProfile": "marketplace",
                },
            )
        )
        await asyncio.wait_for(first.reached.wait(), 120)
        run = next(r for name, r in kube.jobs.runs.items() if "-scrape-" in name)
        job = next(j for j in kube.cluster.jobs() if "-scrape-" in j["metadata"]["name"])
        command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
        assert "--rate-profile marketplace" in command and "--json-progress" in command
        assert run.log is not None
        last = scrape_events(run.log.read_text())[-1]
        obj = await kube.wait_for(
            "alice", lambda o: scraping(o).get("messages") == last["messages"], 30, "scrape progress"
        )
        seen = scraping(obj)
        assert obj["status"]["phase"] == "Scraping"
        assert (seen["channelsDone"], seen["channelsTotal"]) == (last["channels_done"], 3)
        assert 1 <= seen["channelsDone"] < 3 and seen["updatedAt"]
        first.resume()
        obj = await kube.wait_for("alice", lambda o: cond_ok(o, "Scraped"), 120, "scraped")
        assert scraping(obj)["channelsDone"] == scraping(obj)["channelsTotal"] == 3
    finally:
        first.resume()
        await operator.stop()


def cond_ok(obj: dict[str, Any], type_: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions", [])
    return any(c["type"] == type_ and c["status"] == "True" for c in conditions)
