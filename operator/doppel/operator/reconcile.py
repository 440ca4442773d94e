"""Pure reconciliation: from what exists (the object, its Jobs and their pods) to what to do next.

Level-triggered: `reconcile` looks only at the current state, never at what happened before, so an
operator restarted at any point resumes from the Jobs it finds. Job names are deterministic per
generation, step and attempt (see jobs.job_name), so a step never gets two Jobs. No I/O here; the kopf
glue in handlers.py feeds the observations in and carries the plan out.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from doppel.api import (
    Adapter,
    Condition,
    ConditionType,
    DoppelUserSpec,
    DoppelUserStatus,
    EvalSummary,
    ScrapeProgress,
    TrainingProgress,
)
from doppel.operator import jobs
from doppel.operator.config import OperatorConfig
from doppel.operator.jobs import Outcome, Owner, Step


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


@dataclass
class Plan:
    status: DoppelUserStatus
    create: list[dict[str, Any]] = field(default_factory=list)  # Job manifests
    register: Adapter | None = None  # load this on every ready vLLM pod, then call `promote`
    requeue_after: float | None = None  # look again this soon even if nothing changes
    # (pod, container) of the running scrape or train Job: read its log for progress (see `record_progress`
    # and `record_scrape_progress`; which one by the phase).
    progress_from: tuple[str, str] | None = None
    # Jobs given up on (their pod cannot start): Job name -> why. Stopped and marked, kept as the record.
    abandon: dict[str, str] = field(default_factory=dict)
    # Jobs of an earlier generation still running: deleted, so they stop holding a GPU or a slot.
    delete: list[str] = field(default_factory=list)


# Reasons that say a person has to act: posted as Warning Events.
WARNING_REASONS = frozenset(
    {"SecretMissing", "Retrying", "Unschedulable", "OOMKilled", "Forbidden", "Invalid", "Rejected"}
    | jobs.STUCK_WAITING
)


def set_condition(
    status: DoppelUserStatus, type_: ConditionType, ok: bool | None, reason: str, message: str, now: datetime
) -> None:
    """Set a condition; lastTransitionTime moves only when its status changes."""
    value = "Unknown" if ok is None else str(ok)
    for cond in status.conditions:
        if cond.type == type_:
            if cond.status != value:
                cond.last_transition_time = now
            cond.status, cond.reason, cond.message = value, reason, message  # type: ignore[assignment]
            cond.observed_generation = status.observed_generation
            return
    status.conditions.append(
        Condition(
            type=type_,
            status=value,  # type: ignore[arg-type]
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=status.observed_generation,
        )
    )


def condition(status: DoppelUserStatus, type_: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


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


def _new_generation(status: DoppelUserStatus, generation: int, now: datetime) -> DoppelUserStatus:
    """Start over for a new spec, keeping the adapter that serves meanwhile (and its conditions)."""
    fresh = DoppelUserStatus(
        phase="Pending",
        observed_generation=generation,
        adapter=status.adapter,
        served_by=status.served_by,
        conditions=[c for c in status.conditions if c.type in ("Registered", "Ready")],
        last_trained_at=status.last_trained_at,
    )
    set_condition(fresh, "Scraped", False, "NewGeneration", f"generation {generation} not scraped yet", now)
    set_condition(fresh, "Trained", False, "NewGeneration", f"generation {generation} not trained yet", now)
    return fresh


def reconcile(observed: Observed, config: OperatorConfig) -> Plan:
    """Decide the next action and the new status. Deterministic for the same observations."""
    owner, spec, now = observed.owner, observed.spec, observed.now
    status = observed.status.model_copy(deep=True)
    if status.observed_generation != owner.generation:
        status = _new_generation(status, owner.generation, now)
    plan = Plan(status)
    status.reason = status.message = None
    plan.delete = _superseded(observed)

    if status.adapter and status.adapter.version == owner.generation and status.pending_adapter is None:
        status.phase = "Ready"
        plan.requeue_after = config.resync_s
        _prune(observed, config, plan, status.adapter.version)
        return plan
    if status.pending_adapter and status.pending_adapter.version == owner.generation:
        status.phase = "Registering"
        plan.register = status.pending_adapter
        return plan
    if spec.suspend:
        status.reason, status.message = "Suspended", "spec.suspend is set: no new Jobs start"
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
        if observed.secret_problem:
            status.phase, status.reason, status.message = "Pending", "SecretMissing", observed.secret_problem
            set_condition(status, "Scraped", False, "SecretMissing", observed.secret_problem, now)
            plan.requeue_after = config.resync_s
            return plan
        return _start(observed, config, plan, "scrape", 1)
    attempt, job = scrape
    result = _outcome(observed, job)
    if result.state == "running":
        status.phase = "Scraping"
        set_condition(status, "Scraped", False, "Running", f"Job {job['metadata']['name']} running", now)
        plan.progress_from = _train_pod(observed, job)
        plan.requeue_after = config.progress_s
        result = _stuck(observed, config, plan, "scrape", job) or result
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
    return _start(observed, config, plan, "train", 1)


def _start(observed: Observed, config: OperatorConfig, plan: Plan, step: Step, attempt: int) -> Plan:
    """Create the Job for `step` (train Jobs only when the cluster-wide queue lets this object in)."""
    status, now = plan.status, observed.now
    if step == "train" and not observed.may_train():
        status.phase, status.reason = "Pending", "Queued"
        status.message = "waiting for a free training slot (first come, first served)"
        status.queued_at = status.queued_at or now
        set_condition(status, "Trained", False, "Queued", status.message, now)
        plan.requeue_after = config.resync_s
        return plan
    command = (jobs.scrape_command if step == "scrape" else jobs.train_command)(
        observed.spec, config, observed.owner
    )
    plan.create.append(jobs.job_manifest(observed.owner, step, attempt, command, observed.spec, config))
    status.attempt, status.retry_at, status.queued_at = attempt, None, None
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
    """Bad input fails at once; anything else is retried with exponential backoff, a few times."""
    status, now = plan.status, observed.now
    cond: ConditionType = "Scraped" if step == "scrape" else "Trained"
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
    if result.state == "running":
        return plan
    if result.state == "failed":
        return _failed(observed, config, plan, "train", attempt, result)
    status.training = _progress(result.result, now)
    status.eval = _eval(result.result)
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
    found = jobs.stuck(observed.pods.get(name, []))
    if found is None:
        return None
    status, now = plan.status, observed.now
    waited = (now - found.since).total_seconds() if found.since else 0.0
    why = f"{found.reason}: {found.message}" if found.message else found.reason
    if waited >= config.pending_timeout_s:
        why += f" (pod {found.pod} Pending for {int(waited)}s, the limit is {int(config.pending_timeout_s)}s)"
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
    owner = observed.owner
    if any(
        (job["metadata"].get("labels") or {}).get(jobs.L_STEP) == "prune"
        and (job["metadata"].get("labels") or {}).get(jobs.L_GENERATION) == str(owner.generation)
        for job in observed.jobs
    ):
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


def record_progress(
    status: DoppelUserStatus, seen: TrainingProgress | None, now: datetime
) -> DoppelUserStatus:
    """Put the figures read from the train log into the status; unchanged (same object) when they are the
    same, so the caller patches only on a change. A loss the log tail no longer shows stays as it was."""
    if seen is None:
        return status
    before = status.training
    if before is not None:
        seen = seen.model_copy(
            update={
                "loss": seen.loss if seen.loss is not None else before.loss,
                "eval_loss": seen.eval_loss if seen.eval_loss is not None else before.eval_loss,
            }
        )
        if seen.model_dump(exclude={"updated_at"}) == before.model_dump(exclude={"updated_at"}):
            return status
    new = status.model_copy(deep=True)
    new.training = seen.model_copy(update={"updated_at": now})
    return new


def record_scrape_progress(
    status: DoppelUserStatus, seen: ScrapeProgress | None, now: datetime
) -> DoppelUserStatus:
    """Put the figures read from the scrape log into the status; the same object when unchanged."""
    if seen is None:
        return status
    before = status.scraping
    if before is not None and seen.model_dump(exclude={"updated_at"}) == before.model_dump(
        exclude={"updated_at"}
    ):
        return status
    new = status.model_copy(deep=True)
    new.scraping = seen.model_copy(update={"updated_at": now})
    return new


def _progress(result: dict[str, Any], now: datetime) -> TrainingProgress:
    """Final training figures from the train Job's summary (keys as `doppel train` reports them)."""

    def number(*keys: str) -> float | None:
        for key in keys:
            value = result.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None

    steps = number("steps", "total_steps")
    return TrainingProgress(
        step=int(steps or 0),
        total_steps=int(steps) if steps is not None else None,
        epoch=number("epochs", "epoch"),
        loss=number("train_loss", "loss"),
        eval_loss=number("adapter_eval_loss", "eval_loss"),
        base_eval_loss=number("base_eval_loss"),
        percent=100.0 if steps else None,
        updated_at=now,
    )


def _eval(result: dict[str, Any]) -> EvalSummary | None:
    """The fidelity headline `doppel train` put in its summary; None if absent or not understood."""
    try:
        return EvalSummary.model_validate(result["eval"]) if result.get("eval") else None
    except (ValueError, TypeError):
        return None


def promote(
    status: DoppelUserStatus, loaded_on: list[str], errors: dict[str, str], now: datetime
) -> tuple[DoppelUserStatus, Adapter | None]:
    """After loading `status.pending_adapter` on the pods: switch to it only if every ready pod holds it.

    Returns the new status and the old adapter to unload (only after the switch, so mentions never hit
    a missing adapter)."""
    status = status.model_copy(deep=True)
    pending = status.pending_adapter
    assert pending is not None
    if errors or not loaded_on:
        reason = "VllmUnreachable" if errors else "NoVllmPods"
        message = (
            "; ".join(f"{pod}: {err}" for pod, err in sorted(errors.items()))
            if errors
            else "no ready vLLM pod matches spec.vllm.selector"
        )
        status.phase, status.reason, status.message = "Registering", reason, message
        set_condition(status, "Registered", False, reason, message, now)
        return status, None
    old = status.adapter
    status.adapter, status.pending_adapter = pending, None
    status.phase, status.reason, status.message = "Ready", None, None
    status.served_by = sorted(loaded_on)
    message = f"{pending.served_name} on {len(loaded_on)} pod(s)"
    set_condition(status, "Registered", True, "Loaded", message, now)
    set_condition(status, "Ready", True, "Serving", f"answering as {pending.served_name}", now)
    return status, old if old and old.served_name != pending.served_name else None


def observe_serving(
    status: DoppelUserStatus, loaded_on: list[str], errors: dict[str, str], now: datetime
) -> DoppelUserStatus:
    """Record which pods hold the current adapter (after the drift check reloaded it where missing)."""
    status = status.model_copy(deep=True)
    if status.adapter is None:
        return status
    status.served_by = sorted(loaded_on)
    if loaded_on:
        set_condition(status, "Registered", True, "Loaded", f"on {len(loaded_on)} pod(s)", now)
        set_condition(status, "Ready", True, "Serving", f"answering as {status.adapter.served_name}", now)
    else:
        reason = "VllmUnreachable" if errors else "NoVllmPods"
        message = "; ".join(f"{p}: {e}" for p, e in sorted(errors.items())) or "no ready vLLM pod"
        set_condition(status, "Registered", False, reason, message, now)
        set_condition(status, "Ready", False, reason, message, now)
    return status


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


def transitions(old: DoppelUserStatus, new: DoppelUserStatus) -> list[tuple[str, str, str]]:
    """Kubernetes Events (type, reason, message) for what changed between two statuses."""
    events: list[tuple[str, str, str]] = []
    if old.phase != new.phase or old.reason != new.reason:
        kind = "Warning" if new.phase == "Failed" or new.reason in WARNING_REASONS else "Normal"
        message = f"phase {old.phase} -> {new.phase}" + (f": {new.message}" if new.message else "")
        events.append((kind, new.reason or new.phase, message))
    before = {c.type: (c.status, c.reason) for c in old.conditions}
    for cond in new.conditions:
        if before.get(cond.type) != (cond.status, cond.reason):
            fine = cond.status == "True" or cond.reason in ("Running", "NewGeneration")
            kind = "Normal" if fine else "Warning"
            events.append((kind, f"{cond.type}{cond.status}", f"{cond.reason}: {cond.message}"))
    return events
