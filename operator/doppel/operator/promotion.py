"""Serving decisions: switch to a new adapter once every ready vLLM pod holds it, and record which pods
serve the current one after a drift check.

Pure; `registration.py` loads and unloads the adapters and hands the results in.
"""

from __future__ import annotations

from datetime import datetime

from doppel.api import Adapter, DoppelUserStatus
from doppel.operator.conditions import set_condition

ASLEEP = "PoolAsleep"


def asleep_message(adapter: Adapter) -> str:
    return (
        "no vLLM pod runs (the pool scaled to zero): a mention wakes it, and vLLM's LoRA resolver loads "
        f"{adapter.served_name} from the volume on first use"
    )


def _asleep(status: DoppelUserStatus, adapter: Adapter, now: datetime) -> None:
    """Serving with no pod up: nothing holds the adapter, yet the next pod answers with it."""
    message = asleep_message(adapter)
    status.served_by = []
    if status.reason is None:
        status.reason, status.message = ASLEEP, message
    set_condition(status, "Registered", False, ASLEEP, message, now)
    set_condition(status, "Ready", True, ASLEEP, message, now)


def promote(
    status: DoppelUserStatus,
    loaded_on: list[str],
    errors: dict[str, str],
    now: datetime,
    *,
    asleep: bool = False,
) -> tuple[DoppelUserStatus, Adapter | None]:
    """After loading `status.pending_adapter` on the pods: switch to it only if every ready pod holds it.

    `asleep`: the vLLM pool has no pod at all and can serve the adapter by name from the volume (its LoRA
    resolver): switch to it too, so the bot can ask for it and so wake the pool; the pods that start get
    it from the drift repair. Returns the new status and the old adapter to unload (only after the switch,
    so mentions never hit a missing adapter)."""
    status = status.model_copy(deep=True)
    pending = status.pending_adapter
    assert pending is not None
    if asleep and not errors and not loaded_on:
        old = status.adapter
        status.adapter, status.pending_adapter = pending, None
        status.phase, status.reason, status.message = "Ready", None, None
        _asleep(status, pending, now)
        return status, old if old and old.served_name != pending.served_name else None
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
    status: DoppelUserStatus,
    loaded_on: list[str],
    errors: dict[str, str],
    now: datetime,
    *,
    asleep: bool = False,
) -> DoppelUserStatus:
    """Record which pods hold the current adapter (after the drift check reloaded it where missing);
    `asleep` as for `promote`."""
    status = status.model_copy(deep=True)
    if status.adapter is None:
        return status
    if asleep and not errors and not loaded_on:
        _asleep(status, status.adapter, now)
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
