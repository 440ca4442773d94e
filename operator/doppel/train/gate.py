"""The fidelity gate: may a retrained adapter replace the one serving? Pure.

Both adapters are measured on the same held-out set (the new training's: `doppel train --compare-with`
evaluates the serving adapter on it too), and the new one is refused when any headline figure is worse than
the serving one's by more than its tolerance. The tolerances absorb the noise of a few dozen held-out replies
(16 generated replies: one more or one fewer attributed to the person moves likeness by 0.06):

    heldout_loss_adapter          up by at most 2% (relative)
    likeness_adapter              down by at most 0.07
    relevance_adapter             down by at most 0.03
    distinct_adapter              down by at most 0.07
    copy_rate_adapter             up by at most 0.07

A figure missing on either side is not compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LOSS_TOLERANCE = 0.02  # relative
# (figure, higher is better, absolute tolerance)
TOLERANCES: tuple[tuple[str, bool, float], ...] = (
    ("likeness_adapter", True, 0.07),
    ("relevance_adapter", True, 0.03),
    ("distinct_adapter", True, 0.07),
    ("copy_rate_adapter", False, 0.07),
)


def regressions(new: Mapping[str, Any], serving: Mapping[str, Any]) -> list[str]:
    """What is worse in `new` than in `serving` beyond the tolerances (headline figures, `fidelity.headline`),
    one phrase each ("likeness 0.41 < 0.62 serving"); [] when the new adapter may be promoted."""
    worse: list[str] = []
    loss, old_loss = new.get("heldout_loss_adapter"), serving.get("heldout_loss_adapter")
    if loss is not None and old_loss is not None and loss > old_loss * (1 + LOSS_TOLERANCE):
        worse.append(f"held-out loss {loss:.3f} > {old_loss:.3f} serving")
    for name, higher_is_better, tolerance in TOLERANCES:
        value, old = new.get(name), serving.get(name)
        if value is None or old is None:
            continue
        label = name.removesuffix("_adapter").replace("_", " ")
        if higher_is_better and value < old - tolerance:
            worse.append(f"{label} {value:.2f} < {old:.2f} serving")
        if not higher_is_better and value > old + tolerance:
            worse.append(f"{label} {value:.2f} > {old:.2f} serving")
    return worse
