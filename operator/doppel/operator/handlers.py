"""kopf glue: watches, indexes, one loop per DoppelUser and the finalizer; no decisions of its own.

Each DoppelUser gets a kopf daemon that runs `pipeline.step` (observe from kopf's in-memory indexes of
Jobs and pods, ask `reconcile` what to do, do it, publish the status) and sleeps until something relevant
changes (a Job, a pod, the spec) or the resync period elapses. The adapters on the vLLM pods are
registration.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from doppel.api import GROUP, PLURAL, VERSION, DoppelUserSpec, DoppelUserStatus, with_vllm_selector
from doppel.operator import jobs
from doppel.operator.config import OperatorConfig
from doppel.operator.kube import ApiRefused, KubeApi
from doppel.operator.metrics import OperatorMetrics
from doppel.operator.pipeline import State, step
from doppel.operator.reconcile import backoff, deactivation_unseen, purge_ran, purge_record
from doppel.operator.registration import matches, pod_url, unload, vllm_pods

MANAGED = dict(jobs.MANAGED_BY)
FINALIZER = f"{GROUP}/finalizer"
# Each loop's resync period is stretched by up to this share, at random: a thousand loops started together
# (an operator restart) drift apart instead of checking the pods all at the same moment.
RESYNC_JITTER = 0.2
VLLM_DEFAULT_PORT = 8000


def _state(memo: kopf.Memo) -> State:
    return memo["doppel"]  # type: ignore[no-any-return]


def _config(memo: kopf.Memo) -> OperatorConfig:
    return _state(memo).config


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
            # /healthz answers while kopf's event loop runs: the pod's liveness probe restarts a wedged one.
            liveness_endpoint=config.liveness_endpoint,
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
    await _state(memo).models.aclose()
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


def _pool_candidate(body: kopf.Body, labels: kopf.Labels, **_: Any) -> bool:
    """Any pod, ready or not, that is not one of our Job pods nor on its way out."""
    ours = labels.get("app.kubernetes.io/managed-by") == jobs.MANAGED_BY["app.kubernetes.io/managed-by"]
    return not ours and not body.get("metadata", {}).get("deletionTimestamp")


@kopf.index("", "v1", "pods", when=_pool_candidate)
def pool_pods(labels: kopf.Labels, namespace: str, **_: Any) -> dict[str, dict[str, str]]:
    """The labels of every such pod: a vLLM selector matching none says the pool is scaled to zero."""
    return {namespace: dict(labels)}


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
    body: kopf.Body,
    labels: kopf.Labels,
    namespace: str,
    type: str | None,  # kopf's name for the watch event's type
    memo: kopf.Memo,
    doppelusers: kopf.Index,
    **_: Any,
) -> None:
    """A Job's pod finished, or a vLLM pod appeared, restarted, turned ready or went: wake whoever cares,
    within seconds."""
    if jobs.L_UID in labels:
        _wake(memo, labels[jobs.L_UID])
        return
    status = body.get("status") or {}
    if not status.get("podIP"):
        return  # not serving yet: its "ready" event comes later
    fingerprint = None if type == "DELETED" else _pod_state(body)
    if not _state(memo).models.seen(pod_url(dict(body), VLLM_DEFAULT_PORT), fingerprint):
        return
    for entry in doppelusers.get("all", []):
        if entry["namespace"] == namespace and matches(entry["selector"], labels):
            _wake(memo, entry["uid"])


def _pod_state(body: kopf.Body) -> tuple[Any, ...]:
    """What a pod event must change for its doppels to look again: the pod itself, its address, readiness
    and container restarts."""
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    restarts = tuple(c.get("restartCount", 0) for c in status.get("containerStatuses") or [])
    return (body.get("metadata", {}).get("uid"), status.get("podIP"), ready, restarts)


@kopf.on.event(GROUP, VERSION, PLURAL)
def annotations_changed(body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any) -> None:
    """The bot marked the person deactivated, or unmarked them: act now, not at the next resync."""
    published = _state(memo).published.get(uid)
    if published is not None and deactivation_unseen(published, body.get("metadata", {}).get("annotations")):
        _wake(memo, uid)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
def spec_changed(uid: str, memo: kopf.Memo, **_: Any) -> None:
    """The daemon does the work; a new or changed spec only has to wake it now."""
    _wake(memo, uid)


# --- the reconcile loop (each pass: pipeline.step) -----------------------------------------------------


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
    pool_pods: kopf.Index,
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
        "pool_pods": pool_pods,
        "doppelusers": doppelusers,
    }
    failures = 0
    while not stopped:
        wake.clear()
        started = time.monotonic()
        try:
            delay = await step(body, namespace, name, uid, _state(memo), logger, indexes)
            _state(memo).metrics.reconciled(started)
            failures = 0
        except Exception as exc:  # an API hiccup must not end the loop: log, back off, go on
            failures += 1
            _state(memo).metrics.reconcile_failed()
            logger.warning(f"reconcile failed ({type(exc).__name__}: {exc}); retrying")
            delay = backoff(config, failures + 1)
        resync = config.resync_s * (1 + random.uniform(0, RESYNC_JITTER))
        timeout = resync if delay is None else min(delay, resync)
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
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """Unload the adapter from every pod, stop its Jobs, then remove its files with a cleanup Job unless
    kept."""
    config, api = _config(memo), _state(memo).kube
    status = DoppelUserStatus.model_validate(body.get("status") or {})
    try:
        spec = DoppelUserSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return  # never trained anything: nothing to unload or remove
    vllm = vllm_pods(with_vllm_selector(spec, config.vllm_selector), list(ready_pods.get(namespace, [])))
    for adapter in (status.adapter, status.pending_adapter):
        if adapter is not None:
            await unload(_state(memo).models, adapter, vllm, logger)
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
    if job is None and purge_ran(status):
        # Seen finished, then gone (by hand, or the TTL an earlier operator version gave it at creation;
        # this one gives purge Jobs none: they go with their DoppelUser): it ran, do not start it again.
        logger.info(f"cleanup Job {job_name} finished and is gone")
        return
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
    patch.status["lastJob"] = purge_record(result).model_dump(mode="json", by_alias=True, exclude_none=True)
    if result.state == "running":
        raise kopf.TemporaryError("waiting for the cleanup Job", delay=1)
    if result.state == "failed":
        kopf.warn(body, reason="CleanupFailed", message=f"{where} not removed: {result.reason}")
