"""Finished Jobs are deleted ttlSecondsAfterFinished after they end (the emulator plays Kubernetes'
TTL-after-finished controller), and the operator carries on from its status: a DoppelUser waiting in the
training queue does not scrape again when its scrape Job goes, and a failed one stays failed."""

from __future__ import annotations

import asyncio

from tests.integration.test_operator_cluster import phase, started
from tests.integration.test_operator_conditions import doppeluser, reason

from doppel.operator import jobs
from doppel.operator.config import JobPods


def runs(kube, user: str, step: str) -> list[str]:
    """Every Job of `user`'s `step` the Job controller ever saw (deleted ones included)."""
    return [name for name, run in kube.jobs.runs.items() if run.step == step and name.startswith(f"{user}-")]


async def test_finished_jobs_go_after_their_ttl_and_nothing_starts_again(
    kube, operator_config, slack_emulator
):
    kube.jobs.hold("train")  # the first doppel holds the only training slot
    operator = await started(
        kube, operator_config, slack_emulator, max_trainings=1, progress_s=0.5,
        jobs=JobPods(ttl_seconds_after_finished=1),
    )  # fmt: skip
    try:
        await kube.kubectl.create(doppeluser("first"))
        await kube.wait_for("first", lambda o: phase(o) == "Training", 60, "first training")
        await kube.kubectl.create(doppeluser("second"))
        await kube.wait_for("second", lambda o: reason(o) == "Queued", 60, "second queued")
        (scrape,) = runs(kube, "second", "scrape")
        for _ in range(100):  # its scrape Job ended: gone a second later
            if scrape in kube.jobs.ttl_deleted:
                break
            await asyncio.sleep(0.1)
        assert scrape in kube.jobs.ttl_deleted
        assert all(j["metadata"]["name"] != scrape for j in kube.cluster.jobs())
        await asyncio.sleep(2)  # several reconciles without the Job: still queued, no second scrape
        assert reason(await kube.kubectl.get("DoppelUser", "second")) == "Queued"
        assert runs(kube, "second", "scrape") == [scrape]
        kube.jobs.release("train")  # the first trains (and fails: no base model here), freeing the slot
        await kube.wait_for("second", lambda o: phase(o) == "Training", 120, "second trains")
        first = await kube.wait_for("first", lambda o: phase(o) == "Failed", 120, "first failed")
        for _ in range(100):  # the first's Jobs all go; its verdict stays, nothing starts over
            if not [j for j in kube.cluster.jobs() if j["metadata"]["labels"][jobs.L_USER] == "first"]:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        again = await kube.kubectl.get("DoppelUser", "first")
        assert phase(again) == "Failed" and again["status"]["message"] == first["status"]["message"]
        assert len(runs(kube, "first", "scrape")) == 1
    finally:
        await operator.stop()


async def test_a_purge_job_seen_finished_is_not_started_again_once_it_went(
    kube, operator_config, slack_emulator
):
    """Deleting a DoppelUser: the purge Job is written into the status as it is seen; one that was seen
    finished and has since gone (its TTL, while the finalizer was not yet released) is not run again."""
    kube.jobs.hold("purge")
    operator = await started(kube, operator_config, slack_emulator)
    try:
        await kube.kubectl.create(doppeluser("leaving", suspend=True))
        await kube.wait_for("leaving", lambda o: reason(o) == "Suspended", 30, "suspended")
        await kube.kubectl.delete("DoppelUser", "leaving")
        obj = await kube.wait_for(
            "leaving", lambda o: (o["status"].get("lastJob") or {}).get("step") == "purge", 30, "purge seen"
        )
        assert obj["status"]["lastJob"]["outcome"] == "Running"
        kube.jobs.release("purge")
        for _ in range(300):
            if await kube.kubectl.get("DoppelUser", "leaving") is None:
                break
            await asyncio.sleep(0.1)
        assert await kube.kubectl.get("DoppelUser", "leaving") is None
        assert len(runs(kube, "leaving", "purge")) == 1

        # Its purge Job seen Succeeded and gone (an operator restarted before releasing the finalizer).
        gone = doppeluser("purged", suspend=True)
        gone["status"] = {"observedGeneration": 1, "lastJob": {"step": "purge", "outcome": "Succeeded"}}
        await kube.kubectl.create(gone)
        await kube.wait_for("purged", lambda o: reason(o) == "Suspended", 30, "suspended")
        await kube.kubectl.delete("DoppelUser", "purged")
        for _ in range(300):
            if await kube.kubectl.get("DoppelUser", "purged") is None:
                break
            await asyncio.sleep(0.1)
        assert await kube.kubectl.get("DoppelUser", "purged") is None
        assert runs(kube, "purged", "purge") == []
    finally:
        await operator.stop()
