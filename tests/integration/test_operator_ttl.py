"""Finished Jobs are deleted ttlSecondsAfterFinished after they end (the emulator plays Kubernetes'
TTL-after-finished controller), and the operator carries on from its status: a DoppelUser waiting in the
training queue does not scrape again when its scrape Job goes, and a failed one stays failed. The operator
gives a Job its TTL only once the status holds its outcome: one that ends while no operator runs stays
until an operator has seen it."""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
from tests.integration.test_operator_cluster import phase, started
from tests.integration.test_operator_conditions import cond, doppeluser, reason
from tests.support.kube_fixtures import OperatorProcess

from doppel.operator import jobs
from doppel.operator.config import JobPods


def runs(kube, user: str, step: str) -> list[str]:
    """Every Job of `user`'s `step` the Job controller ever saw (deleted ones included)."""
    return [name for name, run in kube.jobs.runs.items() if run.step == step and name.startswith(f"{user}-")]


def created(kube, name: str) -> int:
    """How many times the operator created a Job of this name (a rerun of an attempt reuses its name)."""
    return sum(
        1
        for request in kube.cluster.emulator
        if request.action == kmock.action.CREATE
        and request.resource is not None
        and request.resource.plural == "jobs"
        and isinstance(request.data, dict)
        and (request.data.get("metadata") or {}).get("name") == name
    )


async def run_of(kube, user: str, step: str) -> str:
    """The one Job of `user`'s `step`, once the Job controller has started it."""
    for _ in range(100):
        if found := runs(kube, user, step):
            (name,) = found
            return name
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {step} Job of {user} started")


def job(kube, name: str) -> dict[str, Any] | None:
    return next((j for j in kube.cluster.jobs() if j["metadata"]["name"] == name), None)


async def ends(kube, name: str) -> None:
    """Wait until the Job controller has marked the Job Complete or Failed."""
    for _ in range(600):
        if (job(kube, name) or {}).get("status", {}).get("conditions"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"Job {name} did not finish")


async def goes_by_ttl(kube, name: str) -> None:
    for _ in range(100):
        if name in kube.jobs.ttl_deleted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"Job {name} was not deleted by its TTL: {job(kube, name)}")


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
        (purge,) = runs(kube, "leaving", "purge")
        # No TTL on a purge Job: it goes with its DoppelUser, by its owner reference (the garbage collector).
        for _ in range(50):
            if job(kube, purge) is None:
                break
            await asyncio.sleep(0.1)
        assert job(kube, purge) is None and purge in kube.jobs.collected

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


async def test_a_job_that_ends_while_no_operator_runs_keeps_its_outcome_past_the_ttl(
    kube, operator_config, slack_emulator
):
    """The operator is away (a restart, an upgrade, a crash) while the scrape Job ends, and then while the
    train Job ends, each time for longer than the TTL: each Job is still there when it comes back, so the
    DoppelUser goes on to training, then to its verdict, without running either attempt again. Once the
    status holds an outcome, the Job gets its TTL and goes."""
    kube.jobs.hold("scrape")
    kube.jobs.hold("train")
    ttl = JobPods(ttl_seconds_after_finished=1)
    operator = await started(kube, operator_config, slack_emulator, jobs=ttl)
    try:
        await kube.kubectl.create(doppeluser("away"))
        await kube.wait_for("away", lambda o: phase(o) == "Scraping", 60, "scraping")
        scrape = await run_of(kube, "away", "scrape")
        await operator.stop()
        kube.jobs.release("scrape")
        await ends(kube, scrape)
        await asyncio.sleep(3)  # three TTLs without an operator
        left = job(kube, scrape)
        assert left is not None and left["spec"].get("ttlSecondsAfterFinished") is None
        # Owned by its DoppelUser all along: the garbage collector takes it if the DoppelUser goes first.
        assert left["metadata"]["ownerReferences"][0]["kind"] == "DoppelUser"

        operator = OperatorProcess(operator.config)
        await operator.start()
        obj = await kube.wait_for(
            "away", lambda o: phase(o) == "Training" or created(kube, scrape) > 1, 60, "training"
        )
        assert created(kube, scrape) == 1, "the scrape ran again: its outcome was lost"
        assert phase(obj) == "Training" and cond(obj, "Scraped")["status"] == "True"
        await goes_by_ttl(kube, scrape)  # its outcome recorded: the TTL applies (long past: at once)

        train = await run_of(kube, "away", "train")
        await operator.kill()
        kube.jobs.release("train")  # it fails: no such base model
        await ends(kube, train)
        await asyncio.sleep(3)
        assert job(kube, train) is not None and train not in kube.jobs.ttl_deleted

        operator = OperatorProcess(operator.config)
        await operator.start()
        obj = await kube.wait_for(
            "away", lambda o: phase(o) == "Failed" or created(kube, train) > 1, 60, "train verdict"
        )
        assert created(kube, train) == 1, "the train Job ran again: its outcome was lost"
        assert phase(obj) == "Failed" and "base model" in obj["status"]["message"]
        await goes_by_ttl(kube, train)
        await asyncio.sleep(2)  # with every Job gone, the verdict stands and nothing starts
        again = await kube.kubectl.get("DoppelUser", "away")
        assert phase(again) == "Failed" and again["status"]["message"] == obj["status"]["message"]
        assert kube.cluster.jobs() == [] and created(kube, scrape) == created(kube, train) == 1
    finally:
        await operator.stop()
