"""The operator under kopf against kmock: problems show in conditions and heal by themselves.

No vLLM here: these paths stop before registration (or test the queue with Jobs held).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from tests.support.kube_fixtures import NAMESPACE, OperatorProcess, config_with
from tests.support.slack_fixtures import ACME_TOKEN

from doppel.api import ANNOTATION_DEACTIVATED, LABEL_TEAM
from doppel.operator import jobs


def doppeluser(name: str, user: str = "alice", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "doppel.dev/v1alpha1",
        "kind": "DoppelUser",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "slack": {"teamId": "T0ACME001", "tokenSecretRef": {"name": "slack-bot"}},
            "target": {"handle": user},
            "data": {"minLength": 20},
            "baseModel": {"servedName": "doppel-tiny", "path": "/nonexistent/model"},
            "training": {"rank": 8, "alpha": 16, "maxSteps": 2, "minSamples": 3, "batchSize": 4},
            "resources": {"gpu": 0},  # the Job controller runs pods here, where there is no GPU
            **spec,
        },
    }


def reason(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("reason")


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


async def test_missing_secret_then_unknown_user_then_fixed(kube, operator_config, slack_emulator):
    config = config_with(
        operator_config, slack_api_url=slack_emulator.base_url + "/", scrape_args=("--rate-scale", "1000")
    )
    operator = OperatorProcess(config)
    await operator.start()
    try:
        await kube.kubectl.create(doppeluser("ghost", user="nobody-here"))
        obj = await kube.wait_for("ghost", lambda o: reason(o) == "SecretMissing", 30, "SecretMissing")
        assert cond(obj, "Scraped")["message"] == f"Secret {NAMESPACE}/slack-bot not found"
        assert kube.cluster.jobs() == []
        # The Secret appears: the object recovers by itself and scrapes; the unknown user fails at once.
        await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
        obj = await kube.wait_for(
            "ghost", lambda o: o.get("status", {}).get("phase") == "Failed", 60, "Failed"
        )
        assert reason(obj) == "BadInput" and "nobody-here" in obj["status"]["message"]
        assert len(kube.cluster.jobs()) == 1  # bad input is not retried

        def warned(events: list[dict[str, Any]]) -> bool:
            return any(e["reason"] == "BadInput" and e["type"] == "Warning" for e in events)

        assert warned(await kube.wait_for_events(warned))
        # Fixing the spec (new generation) starts over.
        await kube.kubectl.patch("DoppelUser", "ghost", {"spec": {"target": {"handle": "alice"}}})
        obj = await kube.wait_for(
            "ghost", lambda o: cond(o, "Scraped").get("status") == "True", 60, "scraped"
        )
        assert obj["status"]["observedGeneration"] == 2 and obj["status"]["samples"] >= 3
    finally:
        await operator.stop()


async def test_training_queue_is_fifo_and_bounded(kube, operator_config, slack_emulator):
    config = config_with(
        operator_config,
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "1000"),
        max_trainings=1,
    )
    kube.jobs.hold("train")
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    operator = OperatorProcess(config)
    await operator.start()
    try:
        await kube.kubectl.create(doppeluser("first"))
        await kube.wait_for(
            "first", lambda o: o.get("status", {}).get("phase") == "Training", 60, "first trains"
        )
        # One after the other: scrapes running side by side may finish in either order.
        await kube.kubectl.create(doppeluser("second"))
        await kube.wait_for("second", lambda o: reason(o) == "Queued", 60, "second queued")
        await kube.kubectl.create(doppeluser("third"))
        third = await kube.wait_for("third", lambda o: reason(o) == "Queued", 60, "third queued")
        second = await kube.kubectl.get("DoppelUser", "second")
        assert second["status"]["phase"] == third["status"]["phase"] == "Pending"
        assert second["status"]["queuedAt"] <= third["status"]["queuedAt"]
        train_jobs = [j for j in kube.cluster.jobs() if j["metadata"]["labels"][jobs.L_STEP] == "train"]
        assert [j["metadata"]["labels"][jobs.L_USER] for j in train_jobs] == ["first"]
        # The first training ends (it fails: no such base model); the slot goes to the earliest waiter.
        kube.jobs.release("train")
        kube.jobs.hold("train")
        await kube.wait_for(
            "second", lambda o: o.get("status", {}).get("phase") == "Training", 60, "second trains"
        )
        third = await kube.kubectl.get("DoppelUser", "third")
        assert reason(third) == "Queued"
        running = [
            j
            for j in kube.cluster.jobs()
            if j["metadata"]["labels"][jobs.L_STEP] == "train"
            and not (j.get("status") or {}).get("conditions")
        ]
        assert len(running) == 1
    finally:
        kube.jobs.release("train")
        await operator.stop()


async def test_operator_killed_mid_training_resumes_without_a_second_job(
    kube, operator_config, slack_emulator
):
    config = config_with(
        operator_config, slack_api_url=slack_emulator.base_url + "/", scrape_args=("--rate-scale", "1000")
    )
    kube.jobs.hold("train")
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    operator = OperatorProcess(config)
    await operator.start()
    try:
        await kube.kubectl.create(doppeluser("alice"))
        await kube.wait_for("alice", lambda o: o.get("status", {}).get("phase") == "Training", 60, "training")
        await operator.kill()
        operator = OperatorProcess(config)
        await operator.start()
        kube.jobs.release("train")
        # The train Job (it fails: no such base model) is followed by the new operator instance.
        obj = await kube.wait_for(
            "alice", lambda o: o.get("status", {}).get("phase") == "Failed", 60, "failed"
        )
        assert "base model" in obj["status"]["message"]
        steps = sorted(j["metadata"]["labels"][jobs.L_STEP] for j in kube.cluster.jobs())
        assert steps == ["scrape", "train"]
    finally:
        kube.jobs.release("train")
        await operator.stop()


async def test_a_token_secret_of_another_workspace_is_not_used(kube, operator_config):
    """Workspaces share the namespace: the token the bot stored for team A never scrapes team B."""
    team = "T0ACME001"
    operator = OperatorProcess(operator_config)
    await operator.start()
    try:
        secret = {"token": base64.b64encode(ACME_TOKEN.encode()).decode()}
        await kube.kubectl.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "slack-bot", "namespace": NAMESPACE, "labels": {LABEL_TEAM: team}},
                "data": secret,
            }
        )
        body = doppeluser("other")
        body["spec"]["slack"]["teamId"] = "T0OTHER01"
        await kube.kubectl.create(body)
        obj = await kube.wait_for("other", lambda o: cond(o, "Scraped").get("message"), 30, "a message")
        assert cond(obj, "Scraped")["message"] == (
            f"Secret {NAMESPACE}/slack-bot holds the token of team T0ACME001, not T0OTHER01"
        )
        assert kube.cluster.jobs() == []
    finally:
        await operator.stop()


async def test_a_deactivated_persons_doppeluser_runs_nothing_until_they_are_active_again(
    kube, operator_config, slack_emulator
):
    """The bot marks the DoppelUser of a person Slack deactivated (annotation): the operator says so in a
    condition and starts no Job; once the mark goes, the pipeline goes on by itself."""
    config = config_with(
        operator_config, slack_api_url=slack_emulator.base_url + "/", scrape_args=("--rate-scale", "1000")
    )
    operator = OperatorProcess(config)
    await operator.start()
    try:
        await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
        body = doppeluser("gone")
        body["metadata"]["annotations"] = {ANNOTATION_DEACTIVATED: "true"}
        await kube.kubectl.create(body)
        obj = await kube.wait_for("gone", lambda o: cond(o, "PersonActive").get("status") == "False", 30)
        assert cond(obj, "PersonActive")["reason"] == "Deactivated" and reason(obj) == "Deactivated"
        await asyncio.sleep(3 * config.resync_s)  # several passes: still nothing runs
        assert kube.cluster.jobs() == []

        def noted(events: list[dict[str, Any]]) -> bool:
            return any(e["reason"] == "PersonActiveFalse" for e in events)

        assert noted(await kube.wait_for_events(noted))
        unmarked = {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: None}}}
        await kube.kubectl.patch("DoppelUser", "gone", unmarked)
        obj = await kube.wait_for("gone", lambda o: cond(o, "Scraped").get("status") == "True", 60, "scraped")
        assert cond(obj, "PersonActive")["status"] == "True"
    finally:
        await operator.stop()
