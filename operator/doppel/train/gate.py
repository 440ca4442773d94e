"""The fidelity gate: may a retrained adapter replace the one serving? Pure.

Both adapters are measured on the same held-out set (the new training's: `doppel train --compare-with`
evaluates the serving adapter on it too), and the new one is refused when a headline figure is worse than
the serving one's beyond chance:

    heldout_loss_adapter          up by more than 2% (relative)
    likeness_adapter              paired over the same replies (`Paired`): significantly fewer of the new
                                  adapter's replies taken for the person's (exact one-sided McNemar test,
                                  p < 0.05); without per-reply figures, down by more than 0.07
    relevance_adapter             paired: significantly lower reply by reply (one-sided Wilcoxon signed-rank
                                  test, p < 0.05); without per-reply figures, down by more than 0.03
    distinct_adapter              down by more than 0.07
    copy_rate_adapter             up by more than 0.07

A fixed tolerance on a share of 16 to 24 replies is about one reply: two adapters of the same recipe differ by
that much from noise alone (hyperledger's jyellick retrained on 5 new samples: likeness 0.81 against 0.88),
while a real regression moves many replies the same way. The paired tests weigh that. A figure missing on
either side is not compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LOSS_TOLERANCE = 0.02  # relative
SIGNIFICANCE = 0.05  # one-sided, for the paired tests
# (figure, higher is better, absolute tolerance)
TOLERANCES: tuple[tuple[str, bool, float], ...] = (
    ("likeness_adapter", True, 0.07),
    ("relevance_adapter", True, 0.03),
    ("distinct_adapter", True, 0.07),
    ("copy_rate_adapter", False, 0.07),
)


@dataclass(frozen=True)
class Paired:
    """Per-reply figures of the two adapters, on the same held-out contexts in the same order: whether each
    reply was taken for the person's, and its relevance."""

    person_new: Sequence[bool]
    person_serving: Sequence[bool]
    relevance_new: Sequence[float] = ()
    relevance_serving: Sequence[float] = ()


def regressions(
    new: Mapping[str, Any], serving: Mapping[str, Any], paired: Paired | None = None
) -> list[str]:
    """What is worse in `new` than in `serving` (headline figures, `fidelity.headline`), one phrase each
    ("likeness 0.41 < 0.62 serving"); [] when the new adapter may be promoted. With `paired`, likeness and
    relevance are judged reply by reply (see the module docstring)."""
    worse: list[str] = []
    loss, old_loss = new.get("heldout_loss_adapter"), serving.get("heldout_loss_adapter")
    if loss is not None and old_loss is not None and loss > old_loss * (1 + LOSS_TOLERANCE):
        worse.append(f"held-out loss {loss:.3f} > {old_loss:.3f} serving")
    for name, higher_is_better, tolerance in TOLERANCES:
        value, old = new.get(name), serving.get(name)
        if value is None or old is None:
            continue
        label = name.removesuffix("_adapter").replace("_", " ")
        if paired is not None and name in ("likeness_adapter", "relevance_adapter"):
            if (why := _paired_worse(name, paired)) is not None:
                worse.append(f"{label} {value:.2f} < {old:.2f} serving ({why})")
            continue
        if higher_is_better and value < old - tolerance:
            worse.append(f"{label} {value:.2f} < {old:.2f} serving")
        if not higher_is_better and value > old + tolerance:
            worse.append(f"{label} {value:.2f} > {old:.2f} serving")
    return worse


def _paired_worse(name: str, paired: Paired) -> str | None:
    """Why the new adapter's replies are significantly worse than the serving one's on `name`; None when
    they are not (or cannot be compared reply by reply)."""
    if name == "likeness_adapter":
        if len(paired.person_new) != len(paired.person_serving):
            return None
        pairs = list(zip(paired.person_new, paired.person_serving, strict=True))
        lost = sum(1 for new, old in pairs if old and not new)
        won = sum(1 for new, old in pairs if new and not old)
        p = mcnemar_worse(lost, won)
        if p >= SIGNIFICANCE:
            return None
        return f"{lost} replies no longer taken for the person's, {won} newly; p={p:.3f}"
    if len(paired.relevance_new) != len(paired.relevance_serving) or not paired.relevance_new:
        return None
    differences = [new - old for new, old in zip(paired.relevance_new, paired.relevance_serving, strict=True)]
    p = signed_rank_worse(differences)
    return f"lower reply by reply; p={p:.3f}" if p < SIGNIFICANCE else None


def mcnemar_worse(lost: int, won: int) -> float:
    """The exact one-sided McNemar p-value that the new adapter loses more replies than it wins by chance:
    P(X >= lost) for X ~ Binomial(lost + won, 1/2). 1 when nothing changed."""
    n = lost + won
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n


def signed_rank_worse(differences: Sequence[float]) -> float:
    """The one-sided Wilcoxon signed-rank p-value that `differences` (new minus serving, per reply) are
    below zero; 1 when all are zero."""
    if not any(differences):
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(differences, alternative="less", zero_method="zsplit").pvalue)
