"""Training and scrape progress: read from a Job pod's log (the JSON lines `doppel train --json-progress`
and `doppel scrape --json-progress` print) or from a finished train Job's summary, and put into the status.

Pure, no I/O. The log tail mixes stdout and stderr (warnings, tracebacks) and its first line may
be cut in the middle, so anything that is not a well-formed progress or eval event is skipped.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from doppel.api import DoppelUserStatus, EvalSummary, ScrapeProgress, TrainingProgress


def _number(value: Any) -> float | None:
    # NaN and infinities (a diverging loss) have no JSON form the API server would take.
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _event(line: str) -> dict[str, Any] | None:
    """One progress/eval event with usable step figures, or None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") not in ("progress", "eval"):
        return None
    step, total = event.get("step"), event.get("total_steps")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        return None
    return event


def latest_progress(log: str) -> TrainingProgress | None:
    """The figures of the last valid event in `log`: step, total and epoch from the last one, the loss
    from the last progress line and the eval loss from the last eval line. None when there is none yet."""
    events = [e for e in map(_event, log.splitlines()) if e is not None]
    if not events:
        return None
    last = events[-1]
    loss = next((_number(e.get("loss")) for e in reversed(events) if e["event"] == "progress"), None)
    eval_loss = next((_number(e.get("eval_loss")) for e in reversed(events) if e["event"] == "eval"), None)
    step, total = last["step"], last["total_steps"]
    epoch = _number(last.get("epoch"))
    return TrainingProgress(
        step=step,
        total_steps=total,
        epoch=epoch if epoch is not None and epoch >= 0 else None,
        loss=loss,
        eval_loss=eval_loss,
        percent=round(min(100.0, 100.0 * step / total), 1) if total else None,
    )


def _count(event: dict[str, Any], key: str) -> int | None:
    value = event.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def latest_scrape_progress(log: str) -> ScrapeProgress | None:
    """The figures of the last well-formed scrape event in `log`; None when there is none yet."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("event") != "scrape":
            continue
        keys = ("channels_done", "channels_total", "messages", "rate_limited")
        counts = {k: _count(event, k) for k in keys}
        if any(v is None for k, v in counts.items() if k != "rate_limited"):
            continue
        wait = _number(event.get("wait_s"))
        waiting_on = event.get("waiting_on")
        return ScrapeProgress(
            channels_done=counts["channels_done"] or 0,
            channels_total=counts["channels_total"] or 0,
            messages=counts["messages"] or 0,
            rate_limited=counts["rate_limited"] or 0,
            wait_s=wait if wait and wait > 0 else None,
            waiting_on=waiting_on if isinstance(waiting_on, str) and wait and wait > 0 else None,
        )
    return None


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


def final_progress(result: dict[str, Any], now: datetime) -> TrainingProgress:
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


def eval_summary(result: dict[str, Any]) -> EvalSummary | None:
    """The fidelity headline `doppel train` put in its summary; None if absent or not understood."""
    try:
        return EvalSummary.model_validate(result["eval"]) if result.get("eval") else None
    except (ValueError, TypeError):
        return None
