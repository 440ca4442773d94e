"""Status conditions and the Kubernetes Events a status change posts.

Pure: `set_condition` keeps lastTransitionTime honest (it moves only when a condition's status does), and
`transitions` turns the difference between two statuses into the Events kopf posts.
"""

from __future__ import annotations

from datetime import datetime

from doppel.api import Condition, ConditionType, DoppelUserStatus
from doppel.operator import jobs

# Reasons that say a person has to act: posted as Warning Events.
WARNING_REASONS = frozenset(
    {"SecretMissing", "Retrying", "Unschedulable", "OOMKilled", "Forbidden", "Invalid", "Rejected"}
    | {"FidelityRegressed"}
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
