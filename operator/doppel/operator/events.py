"""What the Events of a Job and its pod say when the pod cannot start, beyond what their status shows
(pure functions over plain Event dicts; pipeline.py fetches them for Jobs that look stuck).

- `FailedCreate` on a Job: the Job controller's pod was refused (a ResourceQuota, Pod Security admission, a
  webhook). The Job has no pod at all, only this Event, in the API server's own words; the Job controller
  keeps retrying with its own backoff, so the operator reports it and starts nothing more.
- `FailedMount` / `FailedAttachVolume` on a pod in ContainerCreating: the volume cannot be mounted (a
  Multi-Attach error of a ReadWriteOnce volume on another node, an NFS server refusing). The kubelet
  retries forever; the status only says ContainerCreating.
- `TriggeredScaleUp` from the cluster autoscaler on an Unschedulable pod: a node is being added, so the
  pod's pending time counts from then, not from its creation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from doppel.operator.jobs import Stuck, counted, timestamp

MOUNT_FAILURES = ("FailedAttachVolume", "FailedMount")
CREATING = frozenset({"ContainerCreating", "PodInitializing"})
SCALE_UP, NO_SCALE_UP = "TriggeredScaleUp", "NotTriggerScaleUp"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _when(event: dict[str, Any]) -> datetime | None:
    series = event.get("series") or {}
    for key in ("lastTimestamp", "eventTime"):
        if found := timestamp(series.get("lastObservedTime") or event.get(key)):
            return found
    return timestamp((event.get("metadata") or {}).get("creationTimestamp"))


def latest(events: list[dict[str, Any]], reasons: tuple[str, ...]) -> dict[str, Any] | None:
    """The newest Event with one of `reasons`, or None."""
    found = [e for e in events if e.get("reason") in reasons]
    return max(found, key=lambda e: _when(e) or EPOCH) if found else None


def _creating(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "", "Pending"):
        return False
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    return any(((c.get("state") or {}).get("waiting") or {}).get("reason") in CREATING for c in containers)


def stuck(
    job: dict[str, Any], pods: list[dict[str, Any]], events: dict[str, list[dict[str, Any]]]
) -> Stuck | None:
    """Why a Job's pod cannot start, read from Events (`events`: object name -> its Events), or None."""
    name = job["metadata"]["name"]
    live = counted(pods)
    if not live and (refused := latest(events.get(name, []), ("FailedCreate",))):
        since = timestamp(job["metadata"].get("creationTimestamp"))
        return Stuck("", "FailedCreate", str(refused.get("message") or ""), since)
    for pod in live:
        pod_name = pod["metadata"]["name"]
        if _creating(pod) and (failed := latest(events.get(pod_name, []), MOUNT_FAILURES)):
            since = timestamp(pod["metadata"].get("creationTimestamp"))
            return Stuck(pod_name, str(failed["reason"]), str(failed.get("message") or ""), since)
    return None


def scale_up(pod: str, events: dict[str, list[dict[str, Any]]]) -> tuple[datetime, str] | None:
    """(when, message) of the cluster autoscaler's scale-up for `pod`, if that is its latest word."""
    said = latest(events.get(pod, []), (SCALE_UP, NO_SCALE_UP))
    if said is None or said.get("reason") != SCALE_UP or (when := _when(said)) is None:
        return None
    return when, str(said.get("message") or "")
