"""kopf glue: watches, indexes and one reconcile loop per DoppelUser; decisions live in reconcile.py.

Each DoppelUser gets a kopf daemon that observes (from kopf's in-memory indexes of Jobs and pods),
asks `reconcile` what to do, does it (create Jobs, load adapters on vLLM pods, patch status, post Events)
and sleeps until something relevant changes (a Job, a pod, the spec) or the resync period elapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from doppel.api import (
    GROUP,
    LABEL_TEAM,
    PLURAL,
    VERSION,
    Adapter,
    DoppelUserSpec,
    DoppelUserStatus,
)
from doppel.operator import jobs
from doppel.operator.config import OperatorConfig
from doppel.operator.kube import ApiRefused, KubeApi
from doppel.operator.metrics import OperatorMetrics
from doppel.operator.progress import latest_progress, latest_scrape_progress
from doppel.operator.reconcile import (
    Observed,
    Plan,
    backoff,
    observe_serving,
    promote,
    queue_admits,
    reconcile,
    record_progress,
    record_scrape_progress,
    refused,
    transitions,
)
from doppel.operator.schedule import retrain_due, with_next_time
from doppel.serve.errors import ServeError
from doppel.serve.vllm import AsyncVllmClient, RetryPolicy

MANAGED = dict(jobs.MANAGED_BY)
# The answer of `_carry_out` for a plan made from a Job index that is behind, and when to look again.
STALE = "stale"
STALE_VIEW_RETRY_S = 1.0
# A train Job we just created counts against the limit until the Job index shows it.
RESERVATION_S = 60.0
# vLLM calls from the operator: fail fast, the loop retries on its own schedule.
VLLM_RETRY = RetryPolicy(attempts=2, initial_delay=0.2, max_delay=1.0)
FINALIZER = f"{GROUP}/finalizer"
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


def _state(memo: kopf.Memo) -> State:
    return memo["doppel"]  # type: ignore[no-any-return]


def _config(memo: kopf.Memo) -> OperatorConfig:
    return _state(memo).config


def _api(memo: kopf.Memo) -> KubeApi:
    api = _state(memo).api
    assert api is not None, "login runs before any handler"
    return api


async def run(
    config: OperatorConfig,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or a signal arrives).

    With `config.peering` set, replicas share kopf's peering object of that name: each picks a random
    priority at start, the highest acts and the others stand by until its record goes stale (a killed
    replica) or is removed (a stopped one). Without it, this process assumes it is the only operator."""
    metrics = OperatorMetrics(enabled=config.metrics_port != 0)
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    try:
        await kopf.operator(
            clusterwide=not config.namespaces,
            namespaces=list(config.namespaces),
            standalone=not config.peering,
            peering_name=config.peering or None,
            # Equal priorities would pause every replica (kopf's rule): make them differ.
            priority=random.randint(1, 2**31 - 1),
            identity=config.peer_id,  # type: ignore[arg-type]
            memo=kopf.Memo(doppel=State(config, metrics=metrics)),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        metrics.close()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: the status belongs to the schema, and the API server
    # would prune unknown status fields anyway.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    # A killed replica's peering record counts as alive this long: the standby's takeover delay.
    settings.peering.lifetime = _config(memo).peering_lifetime_s
    if _config(memo).namespaces:
        # Fixed namespaces: no need to scan namespaces and CRDs cluster-wide (nor the permission to).
        settings.scanning.disabled = True


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    config = _config(memo)
    if config.api_server:
        info: kopf.ConnectionInfo | None = kopf.ConnectionInfo(server=config.api_server, insecure=True)
    else:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        _state(memo).api = KubeApi(info)
    return info


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    if api := _state(memo).api:
        await _leave_terminating_namespaces(api, _config(memo), logger)
        await api.aclose()


async def _leave_terminating_namespaces(api: KubeApi, config: OperatorConfig, logger: logging.Logger) -> None:
    """The operator is stopping because its namespace is being deleted (the chart puts it beside its
    DoppelUsers): nobody would remove their finalizers after it, and the namespace would hang
    Terminating forever. Release them; the files go with the namespace's volume claim."""
    for namespace in config.namespaces:
        try:
            if await api.namespace_terminating(namespace):
                released = await api.release_finalizer(namespace, FINALIZER)
                if released:
                    logger.warning(f"namespace {namespace} is being deleted: released {', '.join(released)}")
        except (httpx.HTTPError, ApiRefused) as exc:
            logger.warning(f"checking namespace {namespace} on the way out: {exc}")


# --- indexes: kopf keeps them current from its watches --------------------------------------------------


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
def doppel_jobs(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    return {labels.get(jobs.L_UID, ""): dict(body)}


@kopf.index("", "v1", "pods", labels=MANAGED)
def job_pods(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    return {labels.get("batch.kubernetes.io/job-name") or labels.get("job-name", ""): dict(body)}


def _vllm_candidate(body: kopf.Body, labels: kopf.Labels, **_: Any) -> bool:
    """A ready pod with an IP that is not one of our Job pods (filters out as soon as it stops being so)."""
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    ours = labels.get("app.kubernetes.io/managed-by") == jobs.MANAGED_BY["app.kubernetes.io/managed-by"]
    deleting = body.get("metadata", {}).get("deletionTimestamp")
    return ready and not ours and bool(status.get("podIP")) and not deleting


@kopf.index("", "v1", "pods", when=_vllm_candidate)
def ready_pods(body: kopf.Body, namespace: str, **_: Any) -> dict[str, dict[str, Any]]:
    """Ready pods: candidates for vLLM, matched against each DoppelUser's selector."""
    return {namespace: dict(body)}


@kopf.index(GROUP, VERSION, PLURAL)
def doppelusers(body: kopf.Body, namespace: str, name: str, uid: str, **_: Any) -> dict[str, Any]:
    """What the queue and the pod watcher need of every object."""
    status = body.get("status") or {}
    selector = (body.get("spec") or {}).get("vllm", {}).get("selector") or {"app.kubernetes.io/name": "vllm"}
    return {
        "all": {
            "key": f"{namespace}/{name}",
            "uid": uid,
            "namespace": namespace,
            "selector": dict(selector),
            "reason": status.get("reason"),
            "queued_at": status.get("queuedAt"),
        }
    }


# --- waking the per-object loops ----------------------------------------------------------------------


def _wake(memo: kopf.Memo, uid: str) -> None:
    if event := _state(memo).wakeups.get(uid):
        event.set()


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
def job_changed(labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake(memo, labels.get(jobs.L_UID, ""))


@kopf.on.event("", "v1", "pods")
def pod_changed(
    body: kopf.Body, labels: kopf.Labels, namespace: str, memo: kopf.Memo, doppelusers: kopf.Index, **_: Any
) -> None:
    """A Job's pod finished, or a vLLM pod (re)appeared: wake whoever cares, within seconds."""
    if jobs.L_UID in labels:
        _wake(memo, labels[jobs.L_UID])
        return
    for entry in doppelusers.get("all", []):
        if entry["namespace"] == namespace and _matches(entry["selector"], labels):
            _wake(memo, entry["uid"])


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
def spec_changed(uid: str, memo: kopf.Memo, **_: Any) -> None:
    """The daemon does the work; a new or changed spec only has to wake it now."""
    _wake(memo, uid)


# --- the reconcile loop --------------------------------------------------------------------------------


def _matches(selector: dict[str, str], labels: Any) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _pod_url(pod: dict[str, Any], default_port: int) -> str:
    ports = [p for c in pod.get("spec", {}).get("containers", []) for p in c.get("ports") or []]
    port = next((p["containerPort"] for p in ports if p.get("name") == "http"), None)
    port = port or (ports[0]["containerPort"] if ports else default_port)
    return f"http://{pod['status']['podIP']}:{port}"


def _vllm_pods(spec: DoppelUserSpec, namespace: str, ready_pods: kopf.Index) -> dict[str, str]:
    """Ready vLLM pods of this object: pod name -> base URL."""
    return {
        pod["metadata"]["name"]: _pod_url(pod, spec.vllm.port)
        for pod in ready_pods.get(namespace, [])
        if _matches(spec.vllm.selector, pod.get("metadata", {}).get("labels") or {})
    }


async def _ensure_loaded(
    adapter: Adapter, pods: dict[str, str], loaded_now: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Load `adapter` on every pod that lacks it (checking /v1/models first): (pods holding it, errors).
    Pods it had to be loaded on are added to `loaded_now`."""

    async def one(pod: str, url: str) -> str | None:
        async with AsyncVllmClient(url, retry=VLLM_RETRY) as client:
            try:
                if any(card.id == adapter.served_name for card in await client.list_models()):
                    return None
                await client.load_adapter(adapter.served_name, adapter.path)
            except ServeError as exc:
                return str(exc)
        if loaded_now is not None:
            loaded_now.append(pod)
        return None

    results = await asyncio.gather(*(one(pod, url) for pod, url in pods.items()))
    errors = {pod: err for pod, err in zip(pods, results, strict=True) if err}
    return [pod for pod in pods if pod not in errors], errors


async def _unload(adapter: Adapter, pods: dict[str, str], logger: logging.Logger | Any) -> None:
    async def one(pod: str, url: str) -> None:
        async with AsyncVllmClient(url, retry=VLLM_RETRY) as client:
            try:
                await client.unload_adapter(adapter.served_name, missing_ok=True)
            except ServeError as exc:
                logger.warning(f"unloading {adapter.served_name} from {pod}: {exc}")

    await asyncio.gather(*(one(pod, url) for pod, url in pods.items()))


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


def _running_trainings(memo: kopf.Memo, doppel_jobs: kopf.Index, job_pods: kopf.Index) -> set[str]:
    running: set[str] = set()
    for uid, owned in doppel_jobs.items():
        for job in owned:
            step = job["metadata"]["labels"].get(jobs.L_STEP)
            pods = list(job_pods.get(job["metadata"]["name"], []))
            if step == "train" and jobs.outcome(job, pods).state == "running":
                running.add(uid)
    reserved: dict[str, float] = _state(memo).reserved
    for uid, since in list(reserved.items()):
        if uid in running or time.monotonic() - since > RESERVATION_S:
            del reserved[uid]
        else:
            running.add(uid)
    return running


def _admission(
    memo: kopf.Memo,
    uid: str,
    key: str,
    status: DoppelUserStatus,
    now: datetime,
    indexes: dict[str, kopf.Index],
) -> bool:
    """FIFO over every object waiting with reason Queued, by queuedAt; reserves the slot when admitted."""
    running = _running_trainings(memo, indexes["doppel_jobs"], indexes["job_pods"]) - {uid}
    queued = [(status.queued_at or now, key)]
    for entry in indexes["doppelusers"].get("all", []):
        if entry["uid"] != uid and entry["reason"] == "Queued" and entry["queued_at"]:
            queued.append((datetime.fromisoformat(entry["queued_at"]), entry["key"]))
    if queue_admits(key, queued, len(running), _config(memo).max_trainings):
        _state(memo).reserved[uid] = time.monotonic()
        return True
    return False


def _dump(status: DoppelUserStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True)


async def _step(
    body: kopf.Body,
    namespace: str,
    name: str,
    uid: str,
    memo: kopf.Memo,
    logger: logging.Logger | Any,
    indexes: dict[str, kopf.Index],
) -> float | None:
    """One reconcile pass; returns how long to sleep at most (None: until woken)."""
    config, api = _config(memo), _api(memo)
    now = datetime.now(UTC)
    current = _state(memo).published.get(uid) or DoppelUserStatus.model_validate(body.get("status") or {})
    try:
        spec = DoppelUserSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        # The CRD schema stops most of these at the API server; the rest is reported, not retried.
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        await _publish(_state(memo), body, current, _invalid(current, message))
        return None
    owner = jobs.Owner(namespace, name, uid, int(body.get("metadata", {}).get("generation") or 1))
    owned = list(indexes["doppel_jobs"].get(uid, []))
    pods = {j["metadata"]["name"]: list(indexes["job_pods"].get(j["metadata"]["name"], [])) for j in owned}
    secret_problem = None
    if not any(j["metadata"]["labels"].get(jobs.L_GENERATION) == str(owner.generation) for j in owned):
        secret_problem = await _secret_problem(api, namespace, spec)
    observed = Observed(
        owner=owner,
        spec=spec,
        status=current,
        jobs=owned,
        pods=pods,
        now=now,
        may_train=lambda: _admission(memo, uid, f"{namespace}/{name}", current, now, indexes),
        secret_problem=secret_problem,
    )
    plan = reconcile(observed, config)
    problem = await _carry_out(api, namespace, plan, logger, _state(memo).metrics)
    if problem == STALE:
        # A Job the plan meant to create exists already: the Job index is behind (a replica that just took
        # over, a watch re-listing). Publishing this plan would move the phase back; look again shortly.
        logger.info("a Job of the plan exists already: the Job index is behind, looking again")
        return STALE_VIEW_RETRY_S
    if problem is not None:
        step, job_name, exc = problem
        logger.warning(f"the API server refused Job {job_name}: {exc}")
        if step in ("scrape", "train"):
            # The pipeline cannot go on without it: say so in the status, ask again after a backoff. (A
            # refused cleanup or prune Job must not hold up registration: it is asked for again later.)
            _state(memo).reserved.pop(uid, None)  # no train Job started: give the slot back
            refusals = _state(memo).refusals[uid] = _state(memo).refusals.get(uid, 0) + 1
            new = refused(plan.status, step, job_name, exc.code, exc.message, now)
            await _publish(_state(memo), body, current, new)
            return backoff(config, refusals)
    _state(memo).refusals.pop(uid, None)
    new, delay = plan.status, plan.requeue_after
    if plan.progress_from is not None:
        log = await _read_log(api, namespace, *plan.progress_from, logger)
        if log is not None and new.phase == "Scraping":
            new = record_scrape_progress(new, latest_scrape_progress(log), now)
        elif log is not None:
            new = record_progress(new, latest_progress(log), now)
    vllm = _vllm_pods(spec, namespace, indexes["ready_pods"])
    if plan.register is not None:
        # Say Registering while the loads run (they can take a while on busy pods).
        await _publish(_state(memo), body, current, new)
        current = new
        started = time.monotonic()
        loaded, errors = await _ensure_loaded(plan.register, vllm)
        _state(memo).metrics.registered(started, loaded, errors)
        new, old = promote(new, loaded, errors, now)
        if old is not None:
            # Only now that every pod serves the new version and the status points at it.
            await _publish(_state(memo), body, current, new)
            current = new
            await _unload(old, vllm, logger)
        if new.pending_adapter is not None:
            delay = config.resync_s
    elif new.phase == "Ready" and new.adapter is not None:
        # Drift repair: every ready pod must hold the current adapter (restarts lose runtime-loaded ones).
        repaired: list[str] = []
        loaded, errors = await _ensure_loaded(new.adapter, vllm, repaired)
        _state(memo).metrics.drift(body["metadata"], repaired, errors)
        new = observe_serving(new, loaded, errors, now)
    new = with_next_time(new, spec, now)
    await _publish(_state(memo), body, current, new)
    requested = _state(memo).retrain_requested
    if (
        spec.retrain_schedule
        and new.phase == "Ready"
        and requested.get(uid) != owner.generation
        and retrain_due(spec.retrain_schedule, new.last_trained_at, now, spec.time_zone)
    ):
        # A spec change is what retrains (new generation, new adapter version), as a user's edit would.
        logger.info(f"retrain schedule {spec.retrain_schedule!r} is due")
        await api.patch_spec(namespace, name, {"retrainRequestedAt": now.isoformat().replace("+00:00", "Z")})
        requested[uid] = owner.generation
    return delay


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
    assert state.api is not None
    await state.api.patch_status(meta["namespace"], meta["name"], after)
    state.published[meta["uid"]] = new
    for kind, reason, message in transitions(old, new):
        kopf.event(body, type=kind, reason=reason, message=message[:1000])


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def pipeline(
    body: kopf.Body,
    namespace: str,
    name: str,
    uid: str,
    memo: kopf.Memo,
    logger: logging.Logger,
    stopped: kopf.DaemonStopped,
    doppel_jobs: kopf.Index,
    job_pods: kopf.Index,
    ready_pods: kopf.Index,
    doppelusers: kopf.Index,
    **_: Any,
) -> None:
    """The per-object loop: reconcile, then sleep until woken or the resync period is over."""
    config = _config(memo)
    wake: asyncio.Event = _state(memo).wakeups.setdefault(uid, asyncio.Event())
    indexes = {
        "doppel_jobs": doppel_jobs,
        "job_pods": job_pods,
        "ready_pods": ready_pods,
        "doppelusers": doppelusers,
    }
    failures = 0
    while not stopped:
        wake.clear()
        try:
            delay = await _step(body, namespace, name, uid, memo, logger, indexes)
            failures = 0
        except Exception as exc:  # an API hiccup must not end the loop: log, back off, go on
            failures += 1
            _state(memo).metrics.reconcile_failed()
            logger.warning(f"reconcile failed ({type(exc).__name__}: {exc}); retrying")
            delay = backoff(config, failures + 1)
        timeout = config.resync_s if delay is None else min(delay, config.resync_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=max(timeout, 0.05))
    _state(memo).wakeups.pop(uid, None)
    _state(memo).published.pop(uid, None)
    _state(memo).metrics.forget(namespace, uid)


# --- deletion -------------------------------------------------------------------------------------------


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def finalize(
    body: kopf.Body,
    namespace: str,
    name: str,
    uid: str,
    memo: kopf.Memo,
    logger: logging.Logger,
    doppel_jobs: kopf.Index,
    job_pods: kopf.Index,
    ready_pods: kopf.Index,
    retry: int,
    **_: Any,
) -> None:
    """Unload the adapter from every pod, stop its Jobs, then remove its files with a cleanup Job unless
    kept."""
    config, api = _config(memo), _api(memo)
    status = DoppelUserStatus.model_validate(body.get("status") or {})
    try:
        spec = DoppelUserSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return  # never trained anything: nothing to unload or remove
    vllm = _vllm_pods(spec, namespace, ready_pods)
    for adapter in (status.adapter, status.pending_adapter):
        if adapter is not None:
            await _unload(adapter, vllm, logger)
    # Stop the object's Jobs first: they hold GPUs and slots, and a running one would write into the
    # directory the purge removes.
    running = [j for j in doppel_jobs.get(uid, []) if j["metadata"]["labels"].get(jobs.L_STEP) != "purge"]
    for job in running:
        if not job["metadata"].get("deletionTimestamp"):
            await api.delete_job(namespace, job["metadata"]["name"])
    if spec.retention.on_deletion == "Keep":
        return
    pods_left = [
        pod
        for key in job_pods
        for pod in job_pods[key]
        if pod["metadata"]["labels"].get(jobs.L_UID) == uid
        and pod["metadata"]["labels"].get(jobs.L_STEP) != "purge"
    ]
    if running or pods_left:
        raise kopf.TemporaryError("waiting for the scrape and train Jobs to go", delay=1)
    owner = jobs.Owner(namespace, name, uid, int(body.get("metadata", {}).get("generation") or 1))
    where = jobs.user_dir(config, namespace, name)
    command = jobs.cleanup_command(config, [where])
    manifest = jobs.job_manifest(owner, "purge", 1, command, spec, config)
    job_name = manifest["metadata"]["name"]
    job = next((j for j in doppel_jobs.get(uid, []) if j["metadata"]["name"] == job_name), None)
    if job is None:
        try:
            await api.create_job(manifest)
        except ApiRefused as exc:
            if exc.namespace_terminating:
                # Nothing can start in a namespace being deleted; hanging would keep it Terminating.
                message = (
                    f"{where} not removed: the namespace is being deleted, so no cleanup Job can start "
                    f"({exc.message}); the files go with the volume claim, or stay on a retained volume"
                )
                logger.warning(message)
                kopf.warn(body, reason="CleanupSkipped", message=message[:1000])
                return
            message = f"the API server refused cleanup Job {job_name} ({exc.code}): {exc.message}"
            kopf.warn(body, reason="CleanupRefused", message=message[:1000])
            raise kopf.TemporaryError(message, delay=backoff(config, retry + 1)) from exc
        raise kopf.TemporaryError("waiting for the cleanup Job", delay=1)
    result = jobs.outcome(job, list(job_pods.get(job_name, [])))
    if result.state == "running":
        raise kopf.TemporaryError("waiting for the cleanup Job", delay=1)
    if result.state == "failed":
        kopf.warn(body, reason="CleanupFailed", message=f"{where} not removed: {result.reason}")
