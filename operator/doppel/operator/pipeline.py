"""One reconcile pass of a DoppelUser: observe (from kopf's indexes and the API server), ask `reconcile`,
carry the plan out (stop, delete and create Jobs, read progress from a pod's log, register the adapter on
the vLLM pods) and publish the status with an Event per transition.

handlers.py runs `step` in each object's loop; `State` is what all of the operator's handlers share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from doppel.api import LABEL_TEAM, DoppelUserSpec, DoppelUserStatus, with_vllm_selector
from doppel.operator import jobs
from doppel.operator.conditions import transitions
from doppel.operator.config import OperatorConfig
from doppel.operator.kube import ApiRefused, KubeApi
from doppel.operator.metrics import OperatorMetrics
from doppel.operator.podmodels import PodModels
from doppel.operator.progress import (
    latest_progress,
    latest_scrape_progress,
    record_progress,
    record_scrape_progress,
)
from doppel.operator.reconcile import (
    Observed,
    Plan,
    backoff,
    person_deactivated,
    queue_admits,
    reconcile,
    refused,
    spec_generation,
)
from doppel.operator.registration import pool_asleep, register, repair_drift, unload, vllm_pods
from doppel.operator.schedule import retrain_due, with_next_time

# The answer of `_carry_out` for a plan made from a Job index that is behind, and when to look again.
STALE = "stale"
STALE_VIEW_RETRY_S = 1.0
# A train Job we just created counts against the limit until the Job index shows it.
RESERVATION_S = 60.0
# Lines of a scrape or train pod's log read for progress: one JSON line per step (or page), plus whatever
# stderr interleaves.
PROGRESS_TAIL_LINES = 50


@dataclass
class State:
    """Shared by all handlers. kopf gives each object a shallow copy of the memo, so mutable state
    lives in this one object the copies all point at."""

    config: OperatorConfig
    api: KubeApi | None = None
    wakeups: dict[str, asyncio.Event] = field(default_factory=dict)  # uid -> wakes its loop
    reserved: dict[str, float] = field(default_factory=dict)  # uid -> when its train Job was admitted
    # uid -> the status this process last wrote. The operator is the only writer of status, so this is
    # the truth even before the watch delivers it back (avoids repeated patches and Events).
    published: dict[str, DoppelUserStatus] = field(default_factory=dict)
    # uid -> the generation a scheduled retrain was requested from (asked once, not at every resync).
    retrain_requested: dict[str, int] = field(default_factory=dict)
    # uid -> API refusals in a row (403, 422...): the backoff before asking again.
    refusals: dict[str, int] = field(default_factory=dict)
    metrics: OperatorMetrics = field(default_factory=lambda: OperatorMetrics(enabled=False))
    # What each vLLM pod serves: one listing per pod per resync interval, for all objects.
    models: PodModels = field(init=False)

    def __post_init__(self) -> None:
        self.models = PodModels(self.config.resync_s)

    @property
    def kube(self) -> KubeApi:
        assert self.api is not None, "login runs before any handler"
        return self.api


async def _secret_problem(api: KubeApi, namespace: str, spec: DoppelUserSpec) -> str | None:
    ref = spec.slack.token_secret_ref
    if spec.slack.export_path or ref is None:
        return None
    secret = await api.get_secret(namespace, ref.name)
    if secret is None:
        return f"Secret {namespace}/{ref.name} not found"
    if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
        return f"Secret {namespace}/{ref.name} has no key {ref.key!r}"
    # Workspaces share a namespace: a Secret the bot wrote for one team never feeds another team's scrape.
    owner = ((secret.get("metadata") or {}).get("labels") or {}).get(LABEL_TEAM)
    if owner and owner != spec.slack.team_id:
        return f"Secret {namespace}/{ref.name} holds the token of team {owner}, not {spec.slack.team_id}"
    return None


def _running_trainings(state: State, doppel_jobs: kopf.Index, job_pods: kopf.Index) -> set[str]:
    running: set[str] = set()
    for uid, owned in doppel_jobs.items():
        for job in owned:
            step = job["metadata"]["labels"].get(jobs.L_STEP)
            pods = list(job_pods.get(job["metadata"]["name"], []))
            if step == "train" and jobs.outcome(job, pods).state == "running":
                running.add(uid)
    reserved = state.reserved
    for uid, since in list(reserved.items()):
        if uid in running or time.monotonic() - since > RESERVATION_S:
            del reserved[uid]
        else:
            running.add(uid)
    return running


def _admission(
    state: State,
    uid: str,
    key: str,
    status: DoppelUserStatus,
    now: datetime,
    indexes: dict[str, kopf.Index],
) -> bool:
    """FIFO over every object waiting with reason Queued, by queuedAt; reserves the slot when admitted."""
    running = _running_trainings(state, indexes["doppel_jobs"], indexes["job_pods"]) - {uid}
    queued = [(status.queued_at or now, key)]
    for entry in indexes["doppelusers"].get("all", []):
        if entry["uid"] != uid and entry["reason"] == "Queued" and entry["queued_at"]:
            queued.append((datetime.fromisoformat(entry["queued_at"]), entry["key"]))
    if queue_admits(key, queued, len(running), state.config.max_trainings):
        state.reserved[uid] = time.monotonic()
        return True
    return False


def _dump(status: DoppelUserStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True)


async def step(
    body: kopf.Body,
    namespace: str,
    name: str,
    uid: str,
    state: State,
    logger: logging.Logger | Any,
    indexes: dict[str, kopf.Index],
) -> float | None:
    """One reconcile pass; returns how long to sleep at most (None: until woken)."""
    config, api = state.config, state.kube
    now = datetime.now(UTC)
    current = state.published.get(uid) or DoppelUserStatus.model_validate(body.get("status") or {})
    try:
        spec = DoppelUserSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        # The CRD schema stops most of these at the API server; the rest is reported, not retried.
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        await _publish(state, body, current, _invalid(current, message))
        return None
    owner = jobs.Owner(namespace, name, uid, int(body.get("metadata", {}).get("generation") or 1))
    owned = list(indexes["doppel_jobs"].get(uid, []))
    pods = {j["metadata"]["name"]: list(indexes["job_pods"].get(j["metadata"]["name"], [])) for j in owned}
    work = str(spec_generation(current, spec, owner.generation))  # unchanged by spec.suspend alone
    seen = await _events(
        api, namespace, [j for j in owned if j["metadata"]["labels"].get(jobs.L_GENERATION) == work], pods
    )
    observed = Observed(
        owner=owner,
        spec=spec,
        status=current,
        jobs=owned,
        pods=pods,
        now=now,
        may_train=lambda: _admission(state, uid, f"{namespace}/{name}", current, now, indexes),
        person_deactivated=person_deactivated(body.get("metadata", {}).get("annotations")),
        events=seen,
    )
    plan = reconcile(observed, config)
    # The token Secret is read only when a scrape Job is about to start: asked on every pass, a thousand
    # Ready doppels (their Jobs gone after the TTL) cost the API server a thousand reads per interval.
    if any(job["metadata"]["labels"].get(jobs.L_STEP) == "scrape" for job in plan.create):
        secret_problem = await _secret_problem(api, namespace, spec)
        if secret_problem is not None:
            plan = reconcile(replace(observed, secret_problem=secret_problem), config)
    problem = await _carry_out(api, namespace, plan, logger, state.metrics)
    if problem == STALE:
        # A Job the plan meant to create exists already: the Job index is behind (a replica that just took
        # over, a watch re-listing). Publishing this plan would move the phase back; look again shortly.
        logger.info("a Job of the plan exists already: the Job index is behind, looking again")
        return STALE_VIEW_RETRY_S
    if problem is not None:
        failed_step, job_name, exc = problem
        logger.warning(f"the API server refused Job {job_name}: {exc}")
        if failed_step in ("scrape", "train"):
            # The pipeline cannot go on without it: say so in the status, ask again after a backoff. (A
            # refused cleanup or prune Job must not hold up registration: it is asked for again later.)
            state.reserved.pop(uid, None)  # no train Job started: give the slot back
            refusals = state.refusals[uid] = state.refusals.get(uid, 0) + 1
            new = refused(plan.status, failed_step, job_name, exc.code, exc.message, now)
            await _publish(state, body, current, new)
            return backoff(config, refusals)
    state.refusals.pop(uid, None)
    new, delay = plan.status, plan.requeue_after
    if plan.progress_from is not None:
        log = await _read_log(api, namespace, *plan.progress_from, logger)
        if log is not None and new.phase == "Scraping":
            new = record_scrape_progress(new, latest_scrape_progress(log), now)
        elif log is not None:
            new = record_progress(new, latest_progress(log), now)
    selected = with_vllm_selector(spec, config.vllm_selector)
    vllm = vllm_pods(selected, list(indexes["ready_pods"].get(namespace, [])))
    asleep = pool_asleep(selected, list(indexes["pool_pods"].get(namespace, [])), config.lora_dir)
    if plan.unload is not None:
        await unload(state.models, plan.unload, vllm, logger)
        logger.info(f"unloaded {plan.unload.served_name}: the person was deactivated")
    if plan.register is not None:
        # Say Registering while the loads run (they can take a while on busy pods).
        await _publish(state, body, current, new)
        current = new
        new, old = await register(state.models, new, vllm, state.metrics, now, asleep)
        if old is not None:
            # Only now that every pod serves the new version and the status points at it.
            await _publish(state, body, current, new)
            current = new
            await unload(state.models, old, vllm, logger)
        if new.pending_adapter is not None:
            delay = config.resync_s
    elif plan.active and new.phase == "Ready" and new.adapter is not None:
        new = await repair_drift(state.models, new, vllm, state.metrics, body["metadata"], now, asleep)
    new = with_next_time(new, spec, now)
    await _publish(state, body, current, new)
    # Only now that the status holds their outcome may the TTL-after-finished controller take them.
    await _expire(api, namespace, plan.expire, config.jobs.ttl_seconds_after_finished, logger)
    requested = state.retrain_requested
    if (
        spec.retrain_schedule
        and not spec.suspend  # a suspended doppel keeps serving what it has
        and plan.active
        and new.phase == "Ready"
        and requested.get(uid) != owner.generation
        and retrain_due(spec.retrain_schedule, new.last_trained_at, now, spec.time_zone)
    ):
        # A spec change is what retrains (new generation, new adapter version), as a user's edit would.
        logger.info(f"retrain schedule {spec.retrain_schedule!r} is due")
        await api.patch_spec(namespace, name, {"retrainRequestedAt": now.isoformat().replace("+00:00", "Z")})
        requested[uid] = owner.generation
    return delay


async def _events(
    api: KubeApi, namespace: str, owned: list[dict[str, Any]], pods: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """The Events that say why a running Job's pod cannot start (events.py): of each running Job without a
    pod (FailedCreate), and of each Pending pod (FailedMount, the cluster autoscaler). Nothing is fetched
    for Jobs whose pods run or that have finished."""
    found: dict[str, list[dict[str, Any]]] = {}
    for job in owned:
        if jobs.outcome(job, []).state != "running" or job["spec"].get("suspend"):
            continue
        name = job["metadata"]["name"]
        live = jobs.counted(pods.get(name, []))
        if not live:
            found[name] = await api.events_for(namespace, "Job", name)
        for pod in live:
            if (pod.get("status") or {}).get("phase") in (None, "", "Pending"):
                pod_name = pod["metadata"]["name"]
                found[pod_name] = await api.events_for(namespace, "Pod", pod_name)
    return found


async def _carry_out(
    api: KubeApi, namespace: str, plan: Plan, logger: logging.Logger | Any, metrics: OperatorMetrics
) -> tuple[str, str, ApiRefused] | str | None:
    """Stop, delete and create the plan's Jobs; (step, Job, refusal) when the API server says no, STALE
    when a Job to create exists already (the plan was made from an index that does not show it yet)."""
    name = ""
    try:
        for name, why in plan.abandon.items():
            await api.stop_job(namespace, name, why)
            logger.warning(f"gave up on Job {name}: {why}")
        for name in plan.delete:
            await api.delete_job(namespace, name)
            logger.info(f"deleted Job {name}: a newer generation replaces it")
        for manifest in plan.create:
            name = manifest["metadata"]["name"]
            if not await api.create_job(manifest):
                return STALE
            logger.info(f"created Job {name}")
            metrics.job_created(manifest)
    except ApiRefused as exc:
        step = next(
            (m["metadata"]["labels"][jobs.L_STEP] for m in plan.create if m["metadata"]["name"] == name), ""
        )
        return step, name, exc
    return None


async def _expire(
    api: KubeApi, namespace: str, names: list[str], ttl_s: int | None, logger: logging.Logger | Any
) -> None:
    """Give finished Jobs the cluster's ttlSecondsAfterFinished (None keeps them until their DoppelUser
    goes). A refusal is logged, not fatal: the Job stays, and the next pass asks again."""
    if ttl_s is None:
        return
    for name in names:
        try:
            await api.expire_job(namespace, name, ttl_s)
        except ApiRefused as exc:
            logger.warning(f"could not set ttlSecondsAfterFinished on Job {name}: {exc}")


async def _read_log(
    api: KubeApi, namespace: str, pod: str, container: str, logger: logging.Logger | Any
) -> str | None:
    """The tail of a Job pod's log; None when unreadable (progress is best effort: the outcome still comes
    from the termination message)."""
    try:
        return await api.pod_log(namespace, pod, container, PROGRESS_TAIL_LINES)
    except httpx.HTTPError as exc:
        logger.debug(f"reading the log of pod {pod}: {exc}")
        return None


def _invalid(status: DoppelUserStatus, message: str) -> DoppelUserStatus:
    new = status.model_copy(deep=True)
    new.phase, new.reason, new.message = "Failed", "InvalidSpec", message
    return new


async def _publish(
    state: State,
    body: kopf.Body,
    old: DoppelUserStatus,
    new: DoppelUserStatus,
) -> None:
    """Patch the status if it changed, with an Event per transition."""
    state.metrics.status(body["metadata"], old, new)
    before, after = _dump(old), _dump(new)
    if before == after:
        return
    meta = body["metadata"]
    await state.kube.patch_status(meta["namespace"], meta["name"], after)
    state.published[meta["uid"]] = new
    for kind, reason, message in transitions(old, new):
        kopf.event(body, type=kind, reason=reason, message=message[:1000])
