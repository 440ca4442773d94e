"""Pure reconciliation: from what exists (the object, its Jobs and their pods) to what to do next.

Level-triggered: `reconcile` looks only at the current state, never at what happened before, so an
operator restarted at any point resumes from the Jobs it finds. Job names are deterministic per
generation, step and attempt (see jobs.job_name), so a step never gets two Jobs. No I/O here; pipeline.py
feeds the observations in and carries the plan out. Conditions and Events are in conditions.py, the
serving switch in promotion.py, progress figures in progress.py.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from doppel.api import (
    ANNOTATION_DEACTIVATED,
    Adapter,
    ConditionType,
    DoppelUserSpec,
    DoppelUserStatus,
    JobRecord,
)
from doppel.operator import events, jobs
from doppel.operator.conditions import condition, set_condition
from doppel.operator.config import OperatorConfig
from doppel.operator.jobs import Outcome, Owner, Step
from doppel.operator.progress import eval_summary, final_progress


@dataclass(frozen=True)
class Observed:
    owner: Owner
    spec: DoppelUserSpec
    status: DoppelUserStatus
    jobs: list[dict[str, Any]]  # this object's Jobs (any generation)
    pods: dict[str, list[dict[str, Any]]]  # Job name -> its pods
    now: datetime
    # Asked only when the object wants to start a train Job: the cluster-wide FIFO queue decides.
    may_train: Callable[[], bool] = lambda: True
    secret_problem: str | None = None  # why the Slack token Secret is unusable, None when it is fine
    person_deactivated: bool = False  # the bot found the person deactivated in Slack (`person_deactivated`)
    # Events of the Jobs that look stuck and of their pods: object name -> its Events (events.py).
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Plan:
    status: DoppelUserStatus
    create: list[dict[str, Any]] = field(default_factory=list)  # Job manifests
    register: Adapter | None = None  # load this on every ready vLLM pod, then `promotion.promote`
    requeue_after: float | None = None  # look again this soon even if nothing changes
    # (pod, container) of the running scrape or train Job: read its log for progress (see progress.py's
    # `record_progress` and `record_scrape_progress`; which one by the phase).
    progress_from: tuple[str, str] | None = None
    # Jobs given up on (their pod cannot start): Job name -> why. Stopped and marked, kept as the record.
    abandon: dict[str, str] = field(default_factory=dict)
    # Jobs of an earlier generation still running: deleted, so they stop holding a GPU or a slot.
    delete: list[str] = field(default_factory=list)
    # False while the person is deactivated: no registration, drift repair or scheduled retrain.
    active: bool = True
    unload: Adapter | None = None  # unload this from every vLLM pod (the person was deactivated)
    # Finished Jobs created without ttlSecondsAfterFinished whose outcome `status` holds (or that nothing
    # reads any more): given the cluster's TTL once the status is published, not before.
    expire: list[str] = field(default_factory=list)


DEACTIVATED = "Slack says the person was deactivated: no Job starts and the adapter is not served"


def person_deactivated(annotations: Mapping[str, str] | None) -> bool:
    """Whether the bot marked the DoppelUser's person deactivated (annotation `ANNOTATION_DEACTIVATED`)."""
    return (annotations or {}).get(ANNOTATION_DEACTIVATED) == "true"


def deactivation_unseen(status: DoppelUserStatus, annotations: Mapping[str, str] | None) -> bool:
    """Whether the annotation says otherwise than the status's PersonActive condition: act on it now."""
    inactive = (found := condition(status, "PersonActive")) is not None and found.status == "False"
    return person_deactivated(annotations) != inactive


def backoff(config: OperatorConfig, attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): exponential, capped. The exponent is
    capped too, so a long outage's failure count never overflows the float."""
    return min(config.max_backoff_s, config.backoff_s * 2 ** min(attempt - 1, 16))


def _latest(observed: Observed, step: Step) -> tuple[int, dict[str, Any]] | None:
    """The highest attempt of `step` for the current generation, as (attempt, Job)."""
    found: list[tuple[int, dict[str, Any]]] = []
    for job in observed.jobs:
        lab = job.get("metadata", {}).get("labels") or {}
        if (
            lab.get(jobs.L_UID) == observed.owner.uid
            and lab.get(jobs.L_GENERATION) == str(observed.owner.generation)
            and lab.get(jobs.L_STEP) == step
        ):
            found.append((int(lab.get(jobs.L_ATTEMPT, "1")), job))
    return max(found, key=lambda pair: pair[0]) if found else None


def _outcome(observed: Observed, job: dict[str, Any]) -> Outcome:
    return jobs.outcome(job, observed.pods.get(job["metadata"]["name"], []))


def spec_digest(spec: DoppelUserSpec) -> str:
    """What a generation trains, as a short digest: the spec without `suspend`, which only says whether
    Jobs may start (defaults left out, so an operator upgrade adding a field changes nothing)."""
    kept = spec.model_dump(mode="json", by_alias=True, exclude={"suspend"}, exclude_defaults=True)
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def spec_generation(status: DoppelUserStatus, spec: DoppelUserSpec, generation: int) -> int:
    """The generation the pipeline works on (Job names, dataset, adapter version): `generation`
    (metadata.generation) unless only spec.suspend changed since the generation the status records."""
    if status.spec_generation is None:
        return generation
    if status.observed_generation == generation or status.spec_digest == spec_digest(spec):
        return status.spec_generation
    return generation


def _new_generation(status: DoppelUserStatus, generation: int, now: datetime) -> DoppelUserStatus:
    """Start over for a new spec, keeping the adapter that serves meanwhile (and its conditions)."""
    fresh = DoppelUserStatus(
        phase="Pending",
        observed_generation=generation,
        adapter=status.adapter,
        served_by=status.served_by,
        conditions=[c for c in status.conditions if c.type in ("Registered", "Ready")],
        last_trained_at=status.last_trained_at,
        spec_generation=generation,
    )
    set_condition(fresh, "Scraped", False, "NewGeneration", f"generation {generation} not scraped yet", now)
    set_condition(fresh, "Trained", False, "NewGeneration", f"generation {generation} not trained yet", now)
    return fresh


def reconcile(observed: Observed, config: OperatorConfig) -> Plan:
    """Decide the next action and the new status. Deterministic for the same observations."""
    plan = _decide(observed, config)
    plan.expire = _recorded(observed, plan)
    return plan


def _recorded(observed: Observed, plan: Plan) -> list[str]:
    """The finished Jobs without a TTL that the new status makes unneeded: the scrape or train Job the
    pipeline goes on from once `status.lastJob` holds its outcome (or a later attempt or step), earlier
    attempts and steps (a later Job exists, started on their outcome), the prune Job once
    `prunedGeneration` says it ran, cleanup Jobs (nothing reads their outcome) and any Job of an earlier
    generation. Never a purge Job: it goes with its DoppelUser (owner reference), after the finalizer
    has read it."""
    status = plan.status
    work = str(status.spec_generation or observed.owner.generation)
    ours = replace(observed, owner=replace(observed.owner, generation=int(work)))
    deciding = _latest(ours, "train") or _latest(ours, "scrape")
    record = status.last_job
    expire = []
    for job in observed.jobs:
        meta, spec = job.get("metadata") or {}, job.get("spec") or {}
        lab = meta.get("labels") or {}
        step, attempt = lab.get(jobs.L_STEP), int(lab.get(jobs.L_ATTEMPT, "1"))
        if (
            # A Job of an earlier operator version has its TTL from creation: nothing to add.
            spec.get("ttlSecondsAfterFinished") is not None
            or meta.get("deletionTimestamp")
            or step == "purge"
            or _outcome(observed, job).state == "running"
        ):
            continue
        if lab.get(jobs.L_GENERATION) != work or step == "cleanup":
            done = True
        elif step == "prune":
            done = status.pruned_generation == int(work)
        elif deciding is not None and deciding[1] is job:
            # Recorded finished, or the status has moved on to a later attempt or step started from it.
            order = (step == "train", attempt)
            seen = None if record is None else (record.step == "train", record.attempt)
            done = seen is not None and (seen > order or (seen == order and record.outcome != "Running"))
        else:
            done = True
        if done:
            expire.append(meta["name"])
    return expire


def _decide(observed: Observed, config: OperatorConfig) -> Plan:
    spec, now = observed.spec, observed.now
    status = observed.status.model_copy(deep=True)
    work = spec_generation(status, spec, observed.owner.generation)
    if work != status.spec_generation and status.observed_generation != observed.owner.generation:
        status = _new_generation(status, work, now)
    # Only spec.suspend changed (the bot suspends and resumes a workspace's doppels): the same work goes on.
    status.observed_generation, status.spec_generation = observed.owner.generation, work
    status.spec_digest = spec_digest(spec)
    owner = replace(observed.owner, generation=work)
    observed = replace(observed, owner=owner)
    plan = Plan(status)
    status.reason = status.message = None
    plan.delete = _superseded(observed)
    if observed.person_deactivated:
        return _deactivated(observed, plan)
    if (found := condition(status, "PersonActive")) is not None and found.status == "False":
        set_condition(status, "PersonActive", True, "Active", "the person is active in Slack again", now)

    if status.adapter and status.adapter.version == owner.generation and status.pending_adapter is None:
        status.phase = "Ready"
        plan.requeue_after = config.resync_s
        if spec.suspend:  # it serves as before; only a retrain would wait
            status.reason, status.message = "Suspended", SUSPENDED
        _prune(observed, config, plan, status.adapter.version)
        return plan
    if status.pending_adapter and status.pending_adapter.version == owner.generation:
        status.phase = "Registering"
        plan.register = status.pending_adapter
        return plan
    if config.max_lora_rank is not None and spec.training.rank > config.max_lora_rank:
        # vLLM would refuse the adapter hours later; say so before anything runs.
        status.phase, status.reason = "Failed", "RankTooHigh"
        status.message = (
            f"spec.training.rank {spec.training.rank} is above vLLM's --max-lora-rank {config.max_lora_rank}"
            " (chart value vllm.maxLoraRank): lower the rank or raise the limit"
        )
        set_condition(status, "Trained", False, "RankTooHigh", status.message, now)
        return plan

    train = _latest(observed, "train")
    if train:
        return _after_train(observed, config, plan, *train)
    scrape = _latest(observed, "scrape")
    if scrape is None:
        return _from_record(observed, config, plan)
    attempt, job = scrape
    result = _outcome(observed, job)
    if result.state == "running":
        status.phase = "Scraping"
        set_condition(status, "Scraped", False, "Running", f"Job {job['metadata']['name']} running", now)
        plan.progress_from = _train_pod(observed, job)
        plan.requeue_after = config.progress_s
        result = _stuck(observed, config, plan, "scrape", job) or result
    _record(status, "scrape", attempt, result)
    if result.state == "running":
        return plan
    if result.state == "failed":
        return _failed(observed, config, plan, "scrape", attempt, result)
    if status.scraping is not None:  # done: no wait left, every channel taken or skipped
        status.scraping = status.scraping.model_copy(
            update={"channels_done": status.scraping.channels_total, "wait_s": None, "waiting_on": None}
        )
    status.samples = int(result.result.get("samples", 0))
    set_condition(status, "Scraped", True, "Scraped", f"{status.samples} samples", now)
    if any(c.type == "StorageWritable" for c in status.conditions):  # it was not, and now is
        set_condition(status, "StorageWritable", True, "Written", "the scrape Job wrote its dataset", now)
    return _start(observed, config, plan, "train", 1)


SUSPENDED = "spec.suspend is set: no new scrape or train Job starts"
OUTCOMES = {"running": "Running", "succeeded": "Succeeded", "failed": "Failed"}


def _record(status: DoppelUserStatus, step: Step, attempt: int, result: Outcome) -> None:
    """Write down what the step's Job came to as soon as it is seen: once that is published the Job gets
    its ttlSecondsAfterFinished (`_recorded`), and after the TTL the status is all there is to go on."""
    reason = result.reason or None if result.state == "failed" else None
    status.last_job = JobRecord(
        step=step,  # type: ignore[arg-type]
        attempt=attempt,
        outcome=OUTCOMES[result.state],  # type: ignore[arg-type]
        reason=reason,
    )


def purge_record(result: Outcome) -> JobRecord:
    """The purge Job (deletion) as seen, for the status: kept there once the Job itself is gone."""
    reason = result.reason or None if result.state == "failed" else None
    return JobRecord(step="purge", outcome=OUTCOMES[result.state], reason=reason)  # type: ignore[arg-type]


def purge_ran(status: DoppelUserStatus) -> bool:
    """Whether the status saw the purge Job finish (a missing one then went after its TTL)."""
    record = status.last_job
    return record is not None and record.step == "purge" and record.outcome != "Running"


def _from_record(observed: Observed, config: OperatorConfig, plan: Plan) -> Plan:
    """No scrape or train Job of this generation exists (never started, or deleted after
    ttlSecondsAfterFinished): go on from what the status recorded of the last one."""
    status, now, record = plan.status, observed.now, plan.status.last_job
    if status.phase == "Failed":  # a verdict on this generation: its Jobs are gone, it stands
        status.reason, status.message = observed.status.reason, observed.status.message
        return plan
    if record is not None and record.step in ("scrape", "train"):
        step: Step = record.step  # type: ignore[assignment]
        if record.outcome == "Failed":  # the backoff and the attempts left go on from where they were
            return _failed(
                observed, config, plan, step, record.attempt, Outcome("failed", {}, record.reason or "")
            )
        if record.outcome == "Running":
            # It went before anyone saw how it ended (deleted by hand, or given its TTL at creation by an
            # earlier operator version that was away longer than that): the same attempt runs again. (A
            # Job index still behind the Job just created finds it exists: pipeline.py then only looks again.)
            name = jobs.job_name(observed.owner, step, record.attempt)
            plan = _start(observed, config, plan, step, record.attempt)
            if plan.create:
                status.message = f"Job {name} went before its outcome was seen: running it again"
            return plan
        if step == "train":  # its verdict stands: Registering (pending_adapter) or kept serving
            status.reason, status.message = observed.status.reason, observed.status.message
            return plan
        return _start(observed, config, plan, "train", 1)  # scraped: its dataset is on the volume
    scraped = condition(status, "Scraped")
    if scraped is not None and scraped.status == "True":  # a status from before lastJob: its dataset is there
        return _start(observed, config, plan, "train", 1)
    if observed.secret_problem:
        status.phase, status.reason, status.message = "Pending", "SecretMissing", observed.secret_problem
        set_condition(status, "Scraped", False, "SecretMissing", observed.secret_problem, now)
        plan.requeue_after = config.resync_s
        return plan
    return _start(observed, config, plan, "scrape", 1)


def _deactivated(observed: Observed, plan: Plan) -> Plan:
    """The person left the workspace: no Job starts and the adapter is unloaded (once), until the bot's
    annotation goes; Jobs already running finish, and what they make waits unregistered."""
    status, now = plan.status, observed.now
    status.reason, status.message = "Deactivated", DEACTIVATED
    set_condition(status, "PersonActive", False, "Deactivated", DEACTIVATED, now)
    plan.active = False
    ready = condition(status, "Ready")
    if status.adapter is not None and (status.served_by or (ready and ready.status == "True")):
        plan.unload, status.served_by = status.adapter, []
        set_condition(status, "Ready", False, "Deactivated", DEACTIVATED, now)
    return plan


def _start(observed: Observed, config: OperatorConfig, plan: Plan, step: Step, attempt: int) -> Plan:
    """Create the Job for `step` (train Jobs only when the cluster-wide queue lets this object in)."""
    status, now = plan.status, observed.now
    if observed.spec.suspend:  # Jobs already running finish; nothing new starts
        status.reason, status.message = "Suspended", SUSPENDED
        return plan
    if step == "train" and not observed.may_train():
        status.phase, status.reason = "Pending", "Queued"
        status.message = "waiting for a free training slot (first come, first served)"
        status.queued_at = status.queued_at or now
        set_condition(status, "Trained", False, "Queued", status.message, now)
        plan.requeue_after = config.resync_s
        return plan
    if step == "scrape":
        command = jobs.scrape_command(observed.spec, config, observed.owner)
    else:
        serving = status.adapter.path if status.adapter else None
        command = jobs.train_command(observed.spec, config, observed.owner, serving)
    plan.create.append(jobs.job_manifest(observed.owner, step, attempt, command, observed.spec, config))
    status.attempt, status.retry_at, status.queued_at = attempt, None, None
    status.last_job = JobRecord(step=step, attempt=attempt, outcome="Running")  # type: ignore[arg-type]
    status.phase = "Scraping" if step == "scrape" else "Training"
    if step == "train":
        status.training = None  # a new run: no figures from an earlier attempt
    else:
        status.scraping = None
    name = jobs.job_name(observed.owner, step, attempt)
    set_condition(status, "Scraped" if step == "scrape" else "Trained", False, "Running", f"Job {name}", now)
    return plan


def _failed(
    observed: Observed, config: OperatorConfig, plan: Plan, step: Step, attempt: int, result: Outcome
) -> Plan:
    """Bad input fails at once; anything else is retried with exponential backoff, a few times. A volume
    the Job could not write also says StorageWritable=False, with the path and the user."""
    status, now = plan.status, observed.now
    cond: ConditionType = "Scraped" if step == "scrape" else "Trained"
    if result.result.get("kind") == "storage":
        set_condition(status, "StorageWritable", False, "NotWritable", result.reason, now)
    if result.bad_input or attempt >= config.max_attempts:
        reason = "BadInput" if result.bad_input else "RetriesExhausted"
        status.phase, status.reason = "Failed", reason
        status.message = f"{step} failed: {result.reason}"
        status.retry_at = None
        set_condition(status, cond, False, reason, status.message, now)
        return plan
    status.phase = "Scraping" if step == "scrape" else "Training"
    if status.retry_at is None or status.attempt != attempt:
        status.attempt = attempt
        status.retry_at = now + timedelta(seconds=backoff(config, attempt))
    if now < status.retry_at:
        status.reason = "Retrying"
        status.message = f"{step} attempt {attempt} failed ({result.reason}); retrying at {status.retry_at}"
        set_condition(status, cond, False, "Retrying", status.message, now)
        plan.requeue_after = (status.retry_at - now).total_seconds()
        return plan
    return _start(observed, config, plan, step, attempt + 1)


def _after_train(
    observed: Observed, config: OperatorConfig, plan: Plan, attempt: int, job: dict[str, Any]
) -> Plan:
    status, now, owner = plan.status, observed.now, observed.owner
    result = _outcome(observed, job)
    if result.state == "running":
        status.phase = "Training"
        set_condition(status, "Trained", False, "Running", f"Job {job['metadata']['name']} running", now)
        plan.progress_from = _train_pod(observed, job)
        plan.requeue_after = config.progress_s
        result = _stuck(observed, config, plan, "train", job) or result
    _record(status, "train", attempt, result)
    if result.state == "running":
        return plan
    if result.state == "failed":
        return _failed(observed, config, plan, "train", attempt, result)
    status.training = final_progress(result.result, now)
    status.eval = eval_summary(result.result)
    if _kept_serving(observed, status, result.result):
        return plan
    adapter = Adapter(
        served_name=jobs.served_name(owner.namespace, owner.name, owner.generation),
        path=jobs.adapter_dir(config, owner.namespace, owner.name, owner.generation),
        version=owner.generation,
        trained_at=now,
    )
    status.pending_adapter, status.last_trained_at = adapter, now
    status.phase = "Registering"
    set_condition(status, "Trained", True, "Trained", f"adapter v{adapter.version} at {adapter.path}", now)
    if observed.spec.retention.after_training == "Delete":
        # The scraped messages are no longer needed once the adapter exists (as the original DoppelBot).
        cleanup = jobs.cleanup_command(config, [jobs.dataset_dir(config, owner)])
        plan.create.append(jobs.job_manifest(owner, "cleanup", 1, cleanup, observed.spec, config))
    plan.register = adapter
    return plan


def _kept_serving(observed: Observed, status: DoppelUserStatus, result: dict[str, Any]) -> bool:
    """The fidelity gate (`doppel.train.gate`): True, with the status saying why, when the new adapter's
    report is worse than the serving adapter's on the same held-out set and spec.training.forcePromotion is
    not set; then the serving adapter stays. Sets condition Promoted either way."""
    from doppel.train.gate import regressions

    serving = eval_summary({"eval": result.get("eval_serving")})
    now, version = observed.now, observed.owner.generation
    if status.adapter is None or serving is None or status.eval is None:
        return False
    # Judged by the train Job, reply by reply (`doppel train --compare-with`); from the headlines otherwise.
    judged = result.get("gate_regressions")
    worse = (
        [str(w) for w in judged]
        if isinstance(judged, list)
        else regressions(status.eval.model_dump(), serving.model_dump())
    )
    if not worse:
        set_condition(
            status, "Promoted", True, "NotWorse", f"v{version} is not worse than the serving one", now
        )
        return False
    if observed.spec.training.force_promotion:
        message = f"v{version} promoted by spec.training.forcePromotion although worse: {'; '.join(worse)}"
        set_condition(status, "Promoted", True, "Forced", message, now)
        return False
    status.phase, status.reason = "Ready", "FidelityRegressed"
    status.message = (
        f"kept v{status.adapter.version}: retrained v{version} is worse on the same held-out replies "
        f"({'; '.join(worse)}); spec.training.forcePromotion serves it anyway"
    )
    set_condition(status, "Promoted", False, "FidelityRegressed", status.message, now)
    set_condition(status, "Trained", True, "Trained", f"v{version} trained, not promoted", now)
    return True


def _superseded(observed: Observed) -> list[str]:
    """Scrape and train Jobs of an earlier generation that still run: the spec changed under them."""
    return [
        job["metadata"]["name"]
        for job in observed.jobs
        if (job["metadata"].get("labels") or {}).get(jobs.L_STEP) in ("scrape", "train")
        and (job["metadata"].get("labels") or {}).get(jobs.L_GENERATION) != str(observed.owner.generation)
        and not job["metadata"].get("deletionTimestamp")
        and _outcome(observed, job).state == "running"
    ]


def _stuck(
    observed: Observed, config: OperatorConfig, plan: Plan, step: Step, job: dict[str, Any]
) -> Outcome | None:
    """A running Job whose pod cannot start: say why in the step's condition; once it has waited
    `pending_timeout_s`, give the Job up (a failed attempt, which frees its slot)."""
    name = job["metadata"]["name"]
    pods = observed.pods.get(name, [])
    found = jobs.stuck(pods) or events.stuck(job, pods, observed.events)
    if found is None:
        return None
    status, now = plan.status, observed.now
    since = found.since
    why = f"{found.reason}: {found.message}" if found.message else found.reason
    if found.reason == "Unschedulable" and (scaling := events.scale_up(found.pod, observed.events)):
        # A node is on its way: the wait counts from the scale-up, not from the pod's creation.
        since = max(since, scaling[0]) if since else scaling[0]
        why += f"; cluster autoscaler: {scaling[1]}"
    waited = (now - since).total_seconds() if since else 0.0
    if waited >= config.pending_timeout_s:
        what = f"pod {found.pod}" if found.pod else "its pod, never created,"
        why += f" ({what} Pending for {int(waited)}s, the limit is {int(config.pending_timeout_s)}s)"
        plan.abandon[name] = why
        return Outcome("failed", {}, why, found.reason)
    status.reason = found.reason
    status.message = f"Job {name} cannot start: {why}"
    set_condition(
        status, "Scraped" if step == "scrape" else "Trained", False, found.reason, status.message, now
    )
    left = config.pending_timeout_s - waited
    plan.requeue_after = min(plan.requeue_after or left, left)
    return None


def _prune(observed: Observed, config: OperatorConfig, plan: Plan, served: int) -> None:
    """Once a version serves, remove adapter versions more than `keep_adapters` below it (and what killed
    runs of those generations left behind), with one cleanup Job per generation."""
    owner, status = observed.owner, plan.status
    if status.pruned_generation == owner.generation:
        return  # its prune Job ran: once per generation, not after every ttlSecondsAfterFinished
    prune = _latest(observed, "prune")
    if prune is not None:
        if _outcome(observed, prune[1]).state != "running":
            # Done; what a failed one could not remove, the next generation's prune Job looks at again.
            status.pruned_generation = owner.generation
        return
    oldest = served - config.keep_adapters  # versions from here up are kept
    paths = [
        jobs.adapter_dir(config, owner.namespace, owner.name, version)
        for version in range(max(1, oldest - PRUNE_MAX), oldest)
    ]
    # Killed runs leave temporary directories (fsutil.atomic_directory); none of this object's Jobs runs now.
    home = jobs.user_dir(config, owner.namespace, owner.name)
    partials_in = (home, posixpath.join(home, "adapters"))
    if paths or observed.owner.generation > 1:
        command = jobs.cleanup_command(config, paths, partials_in)
        plan.create.append(jobs.job_manifest(owner, "prune", 1, command, observed.spec, config))


# Versions one prune Job looks at: the ones below were pruned by earlier generations' Jobs.
PRUNE_MAX = 200


def _train_pod(observed: Observed, job: dict[str, Any]) -> tuple[str, str] | None:
    """(pod, container) whose log shows the running Job's progress: its newest started pod."""
    containers = job.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    container = containers[0].get("name", "train")
    started = [
        pod
        for pod in jobs.counted(observed.pods.get(job["metadata"]["name"], []))
        if (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
    ]
    if not started:
        return None
    newest = max(started, key=lambda pod: (pod.get("status") or {}).get("startTime") or "")
    return newest["metadata"]["name"], container


def refused(
    status: DoppelUserStatus, step: str, job: str, code: int, why: str, now: datetime
) -> DoppelUserStatus:
    """The API server refused to create or change a Job: say so with its words (retried with backoff)."""
    new = status.model_copy(deep=True)
    reason = {403: "Forbidden", 422: "Invalid"}.get(code, "Rejected")
    new.reason, new.message = reason, f"the API server refused Job {job} ({code}): {why}"
    if step in ("scrape", "train"):
        new.phase = "Pending"
        set_condition(new, "Scraped" if step == "scrape" else "Trained", False, reason, new.message, now)
    return new


def queue_admits(me: str, queued: Iterable[tuple[datetime, str]], running: int, limit: int) -> bool:
    """FIFO admission to training: `me` may start if it is among the first (limit - running) waiting.

    `queued` holds (queued_at, key) of every object waiting for a slot, `me` included."""
    free = limit - running
    if free <= 0:
        return False
    order = [key for _, key in sorted(queued)]
    return me in order[:free]
