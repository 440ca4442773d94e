"""The operator under kopf against what a real cluster does that the happy path never shows: pods that
cannot start, Jobs that run too long, disruptions, OOM kills, API refusals (quota 403, validation 422),
superseded Jobs, and a namespace being deleted under a DoppelUser.

The emulator (tests/support/kube_fixtures.py) plays the scheduler, kubelet, Job controller and API server
with the real objects' shapes and the real messages; the tests look only at what a user sees: the
DoppelUser's status and conditions, Events, and the Jobs in the namespace.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.integration.test_operator_conditions import cond, doppeluser, reason
from tests.support.kube_fixtures import (
    INVALID_MESSAGE,
    NAMESPACE,
    QUOTA_MESSAGE,
    OperatorProcess,
    config_with,
)
from tests.support.slack_fixtures import ACME_TOKEN

from doppel.operator import jobs
from doppel.operator.config import OperatorConfig

NO_GPU = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


def phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


def step_jobs(kube: Any, step: str) -> list[dict[str, Any]]:
    return [j for j in kube.cluster.jobs() if j["metadata"]["labels"][jobs.L_STEP] == step]


def warned(reason_: str) -> Any:
    return lambda events: any(e["reason"] == reason_ and e["type"] == "Warning" for e in events)


async def started(kube: Any, base: OperatorConfig, slack_emulator: Any, **changes: Any) -> OperatorProcess:
    config = config_with(
        base,
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "1000"),
        **changes,
    )
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    operator = OperatorProcess(config)
    await operator.start()
    return operator


async def test_unschedulable_train_pod_is_reported_then_given_up_and_frees_the_slot(
    kube, operator_config, slack_emulator
):
    stuck = kube.jobs.stick("train", "Unschedulable", NO_GPU)
    operator = await started(kube, operator_config, slack_emulator, max_trainings=1, pending_timeout_s=4.0)
    try:
        await kube.kubectl.create(doppeluser("first"))
        obj = await kube.wait_for("first", lambda o: reason(o) == "Unschedulable", 60, "Unschedulable")
        assert phase(obj) == "Training"
        assert cond(obj, "Trained")["reason"] == "Unschedulable" and NO_GPU in cond(obj, "Trained")["message"]
        assert warned("Unschedulable")(await kube.wait_for_events(warned("Unschedulable")))
        await kube.kubectl.create(doppeluser("second"))
        await kube.wait_for("second", lambda o: reason(o) == "Queued", 60, "second queued")
        # The limit passes: the Job is stopped (its pod deleted), marked and counted as a failed attempt.
        obj = await kube.wait_for("first", lambda o: reason(o) == "Retrying", 60, "first gives up")
        assert "Unschedulable" in obj["status"]["message"] and "Pending for" in obj["status"]["message"]
        (given_up,) = [
            j
            for j in step_jobs(kube, "train")
            if j["metadata"]["labels"][jobs.L_USER] == "first"
            and j["metadata"]["labels"][jobs.L_ATTEMPT] == "1"
        ]
        assert given_up["spec"]["suspend"] is True
        assert NO_GPU in given_up["metadata"]["annotations"][jobs.A_ABANDONED]
        # The slot is free: the queued object trains (and the scheduler finds room for it).
        stuck.clear()
        await kube.wait_for(
            "second",
            lambda o: cond(o, "Trained").get("reason") not in (None, "NewGeneration", "Queued"),
            60,
            "second admitted to training",
        )
        assert any(j["metadata"]["labels"][jobs.L_USER] == "second" for j in step_jobs(kube, "train"))
    finally:
        await operator.stop()


async def test_image_pull_backoff_shows_until_the_image_is_there(kube, operator_config, slack_emulator):
    message = 'Back-off pulling image "doppel-worker:test"'
    stuck = kube.jobs.stick("scrape", "ImagePullBackOff", message)
    operator = await started(kube, operator_config, slack_emulator)
    try:
        await kube.kubectl.create(doppeluser("pull"))
        obj = await kube.wait_for("pull", lambda o: reason(o) == "ImagePullBackOff", 60, "ImagePullBackOff")
        assert phase(obj) == "Scraping" and message in cond(obj, "Scraped")["message"]
        assert warned("ImagePullBackOff")(await kube.wait_for_events(warned("ImagePullBackOff")))
        stuck.clear()  # the registry answers again: the kubelet pulls, the pod runs
        obj = await kube.wait_for("pull", lambda o: cond(o, "Scraped").get("status") == "True", 60, "scraped")
        assert len(step_jobs(kube, "scrape")) == 1
    finally:
        await operator.stop()


async def test_disruption_costs_no_attempt_oom_and_deadline_are_reported(
    kube, operator_config, slack_emulator
):
    # Freeze the scrape as soon as it runs, so the disruption hits it mid-way.
    frozen = kube.jobs.pause_when("scrape", lambda log: True)
    kube.jobs.oom("train")
    operator = await started(kube, operator_config, slack_emulator, deadlines_s={"scrape": 300, "train": 2})
    try:
        spec = doppeluser("edge")
        spec["spec"]["resources"] = {"gpu": 0, "memory": "2Gi"}
        await kube.kubectl.create(spec)
        await frozen.reached.wait()
        name = kube.jobs.disrupt("scrape")
        # A new pod takes over in the same Job (podFailurePolicy Ignore): no attempt used up.
        obj = await kube.wait_for("edge", lambda o: cond(o, "Scraped").get("status") == "True", 60, "scraped")
        assert len(step_jobs(kube, "scrape")) == 1 and obj["status"]["samples"] >= 3
        pods = [p for p in await kube.kubectl.list("Pod") if p["metadata"]["labels"].get("job-name") == name]
        assert len(pods) == 2
        # The first train container runs out of memory: reported with the memory hint, then retried.
        obj = await kube.wait_for("edge", lambda o: "OOMKilled" in (o["status"].get("message") or ""), 60)
        assert reason(obj) == "Retrying" and "limit 2Gi" in obj["status"]["message"]
        assert "spec.resources.memory" in obj["status"]["message"]
        # The retry hangs (held) past its activeDeadlineSeconds: the Job controller fails it.
        kube.jobs.hold("train")
        obj = await kube.wait_for(
            "edge", lambda o: "DeadlineExceeded" in (o["status"].get("message") or ""), 60, "deadline"
        )
        assert reason(obj) == "Retrying" and obj["status"]["attempt"] == 2
        assert all(j["spec"]["activeDeadlineSeconds"] == 2 for j in step_jobs(kube, "train"))
    finally:
        kube.jobs.release("train")
        await operator.stop()


async def test_slack_down_is_retried_with_backoff_not_failed_as_bad_input(
    kube, operator_config, slack_emulator
):
    operator = await started(kube, operator_config, slack_emulator)
    try:
        # Slack answers 503 for longer than one scrape's own retries (4 tries): a transient failure.
        slack_emulator.fail("auth.test", 4, status=503)
        await kube.kubectl.create(doppeluser("flaky"))
        obj = await kube.wait_for("flaky", lambda o: reason(o) == "Retrying", 90, "Retrying")
        assert "HTTP 503" in obj["status"]["message"]
        obj = await kube.wait_for(
            "flaky", lambda o: cond(o, "Scraped").get("status") == "True", 90, "scraped"
        )
        attempts = sorted(j["metadata"]["labels"][jobs.L_ATTEMPT] for j in step_jobs(kube, "scrape"))
        assert attempts == ["1", "2"]  # the first failed on Slack, the retry got through
    finally:
        await operator.stop()


async def test_api_refusals_become_conditions_with_the_servers_words(kube, operator_config, slack_emulator):
    quota = kube.cluster.refuse("jobs", 403, "Forbidden", QUOTA_MESSAGE)
    operator = await started(kube, operator_config, slack_emulator)
    try:
        await kube.kubectl.create(doppeluser("refused"))
        obj = await kube.wait_for("refused", lambda o: reason(o) == "Forbidden", 60, "Forbidden")
        assert "exceeded quota: team-quota" in cond(obj, "Scraped")["message"]
        assert cond(obj, "Scraped")["reason"] == "Forbidden" and phase(obj) == "Pending"
        assert warned("Forbidden")(await kube.wait_for_events(warned("Forbidden")))
        kube.cluster.allow(quota)
        invalid = kube.cluster.refuse("jobs", 422, "Invalid", INVALID_MESSAGE)
        obj = await kube.wait_for("refused", lambda o: reason(o) == "Invalid", 60, "Invalid")
        assert "must be equal to requests" in cond(obj, "Scraped")["message"]
        # Backoff, not a tight loop: a handful of tries in the seconds this took.
        assert quota.refused + invalid.refused < 15
        kube.cluster.allow(invalid)
        await kube.wait_for("refused", lambda o: cond(o, "Scraped").get("status") == "True", 60, "scraped")
    finally:
        await operator.stop()


async def test_train_pod_given_a_gpu_that_sees_none_fails_with_that_reason(
    kube, operator_config, slack_emulator, tiny_model
):
    operator = await started(kube, operator_config, slack_emulator, max_attempts=1)
    try:
        spec = doppeluser("gpu", baseModel={"servedName": "doppel-tiny", "path": str(tiny_model)})
        spec["spec"]["resources"] = {"gpu": 1}
        await kube.kubectl.create(spec)
        obj = await kube.wait_for("gpu", lambda o: phase(o) == "Failed", 120, "Failed")
        assert "asked for a GPU but sees no CUDA device" in cond(obj, "Trained")["message"]
        (train,) = step_jobs(kube, "train")
        env = {e["name"]: e.get("value") for e in train["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["DOPPEL_REQUIRE_GPU"] == "1"
    finally:
        await operator.stop()


async def test_rank_above_vllms_limit_is_refused_before_any_job(kube, operator_config, slack_emulator):
    operator = await started(kube, operator_config, slack_emulator, max_lora_rank=32)
    try:
        spec = doppeluser("big")
        spec["spec"]["training"]["rank"] = 64
        await kube.kubectl.create(spec)
        obj = await kube.wait_for("big", lambda o: reason(o) == "RankTooHigh", 30, "RankTooHigh")
        assert phase(obj) == "Failed" and "--max-lora-rank 32" in cond(obj, "Trained")["message"]
        assert kube.cluster.jobs() == []
    finally:
        await operator.stop()


async def test_superseded_job_is_deleted_and_deletion_purges_after_jobs_are_gone(
    kube, operator_config, slack_emulator
):
    kube.jobs.hold("train")
    operator = await started(kube, operator_config, slack_emulator)
    try:
        await kube.kubectl.create(doppeluser("moving"))
        await kube.wait_for("moving", lambda o: phase(o) == "Training", 60, "training")
        (old,) = step_jobs(kube, "train")
        # A new generation while it trains: the old train Job stops holding its GPU.
        await kube.kubectl.patch("DoppelUser", "moving", {"spec": {"data": {"minLength": 21}}})
        await kube.wait_for(
            "moving",
            lambda o: o["status"].get("observedGeneration") == 2 and phase(o) == "Training",
            60,
            "generation 2 trains",
        )
        names = [j["metadata"]["name"] for j in kube.cluster.jobs()]
        assert old["metadata"]["name"] not in names
        # Deleting the object: its Jobs go first, then the purge Job runs.
        await kube.kubectl.delete("DoppelUser", "moving")
        for _ in range(300):
            if step_jobs(kube, "purge"):
                break
            await asyncio.sleep(0.1)
        assert step_jobs(kube, "purge") and not step_jobs(kube, "scrape") and not step_jobs(kube, "train")
        for _ in range(300):
            if await kube.kubectl.get("DoppelUser", "moving") is None:
                break
            await asyncio.sleep(0.1)
        assert await kube.kubectl.get("DoppelUser", "moving") is None
    finally:
        kube.jobs.release("train")
        await operator.stop()


async def test_deleting_the_namespace_never_hangs_on_the_purge(kube, operator_config, slack_emulator):
    kube.jobs.hold("train")
    operator = await started(kube, operator_config, slack_emulator)
    try:
        await kube.kubectl.create(doppeluser("leaving"))
        await kube.wait_for("leaving", lambda o: phase(o) == "Training", 60, "training")
        # `kubectl delete namespace`: the namespace refuses new content, its controller deletes objects.
        kube.cluster.terminate_namespace()
        await kube.kubectl.delete("DoppelUser", "leaving")
        for _ in range(900):  # 90 s: on a loaded CI machine the finalizer's refused purge took over 30 s
            if await kube.kubectl.get("DoppelUser", "leaving") is None:
                break
            await asyncio.sleep(0.1)
        assert await kube.kubectl.get("DoppelUser", "leaving") is None  # the finalizer let go
        assert kube.cluster.jobs() == []  # the train Job was deleted, no purge Job could start
        assert operator.error is None
    finally:
        kube.jobs.release("train")
        await operator.stop()


async def test_an_operator_stopped_by_its_namespace_deletion_lets_go_of_its_doppelusers(
    kube, operator_config, slack_emulator
):
    kube.jobs.hold("scrape")
    operator = await started(kube, operator_config, slack_emulator, namespaces=(NAMESPACE,))
    try:
        await kube.kubectl.create(doppeluser("orphan"))
        await kube.wait_for("orphan", lambda o: phase(o) == "Scraping", 60, "scraping")
        assert (await kube.kubectl.get("DoppelUser", "orphan"))["metadata"]["finalizers"]
        # The namespace controller deletes the operator's pod as well as the DoppelUsers: the operator,
        # stopping, sees its namespace Terminating and releases the finalizers nobody else would.
        kube.cluster.terminate_namespace()
        await operator.stop()
        assert not (await kube.kubectl.get("DoppelUser", "orphan"))["metadata"].get("finalizers")
        await kube.kubectl.delete("DoppelUser", "orphan")
        assert await kube.kubectl.get("DoppelUser", "orphan") is None
    finally:
        kube.jobs.release("scrape")
        await operator.stop()
