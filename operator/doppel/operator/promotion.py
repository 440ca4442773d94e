"""Serving decisions: switch to a new adapter once every ready vLLM pod holds it, and record which pods
serve the current one after a drift check.

Pure; `registration.py` loads and unloads the adapters and hands the results in.
"""

from __future__ import annotations

from datetime import datetime

from doppel.api import Adapter, DoppelUserStatus
from doppel.operator.conditions import set_condition


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
