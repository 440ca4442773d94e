"""Progress from a Job pod's log: the JSON lines `doppel train --json-progress` and `doppel scrape
--json-progress` print.

Pure parsing, no I/O. The log tail mixes stdout and stderr (warnings, tracebacks) and its first line may
be cut in the middle, so anything that is not a well-formed progress or eval event is skipped.
"""

from __future__ import annotations

import json
import math
from typing import Any

from doppel.api import ScrapeProgress, TrainingProgress


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
