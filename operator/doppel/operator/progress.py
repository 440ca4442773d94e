"""Training progress from the train pod's log: the JSON lines `doppel train --json-progress` prints.

Pure parsing, no I/O. The log tail mixes stdout and stderr (warnings, tracebacks) and its first line may
be cut in the middle, so anything that is not a well-formed progress or eval event is skipped.
"""

from __future__ import annotations

import json
import math
from typing import Any

from doppel.api import TrainingProgress


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
