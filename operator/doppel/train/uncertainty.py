"""How far the fidelity report's figures could move by chance. Pure (scipy).

A CPU budget's report stands on 16 to 24 held-out replies: one reply more or less taken for the person's
moves the likeness by 0.04 to 0.06, and the relevance of two sets of replies differs by a few thousandths
from their wording alone (measured on hyperledger's five most active: docs/fidelity.md). So the report gives,
beside each figure a reader compares:

- `share_interval`: Wilson's 95% interval of a share (the likeness of the adapter, of the prompted base, of
  the real replies), scipy's `binomtest`;
- `paired_difference`: the adapter's figure minus the persona-prompted base's on the same contexts, reply by
  reply, with a 95% percentile bootstrap interval of the mean difference (scipy's `bootstrap`, a fixed seed:
  the same report twice gives the same interval). An interval across 0 says the two are not told apart by
  these replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONFIDENCE = 0.95
RESAMPLES = 4000
SEED = 0
# Under this many pairs a bootstrap interval means nothing (3 replies alike in both sets would read "0
# [0, 0]"): the mean difference is given without one.
MIN_PAIRS = 8


def share_interval(hits: int, total: int) -> list[float] | None:
    """Wilson's interval of `hits` out of `total`; None for no trials."""
    if total <= 0:
        return None
    from scipy.stats import binomtest

    interval = binomtest(hits, total).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return [round(float(interval.low), 4), round(float(interval.high), 4)]


def paired_difference(first: Sequence[float], second: Sequence[float]) -> dict[str, Any] | None:
    """The mean of `first[i] - second[i]` and its bootstrap interval (None under `MIN_PAIRS` pairs); None
    unless both are the same length and not empty."""
    if len(first) != len(second) or not first:
        return None
    import numpy as np
    from scipy.stats import bootstrap

    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    mean = float(differences.mean())
    if len(differences) < MIN_PAIRS:
        return {"mean": round(mean, 4), "interval": None}
    if np.ptp(differences) == 0:  # every pair differs alike: nothing to resample
        low = high = mean
    else:
        result = bootstrap(
            (differences,),
            np.mean,
            confidence_level=CONFIDENCE,
            n_resamples=RESAMPLES,
            method="percentile",
            rng=np.random.default_rng(SEED),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {"mean": round(mean, 4), "interval": [round(low, 4), round(high, 4)]}


def report_section(
    taken: dict[str, Sequence[bool]], relevance: dict[str, Sequence[float] | None]
) -> dict[str, Any]:
    """eval.json's `uncertainty`: for each set of replies (adapter, prompted_base, real) whether each was
    taken for the person's (`taken`) and, for adapter and prompted_base, each reply's relevance."""
    section: dict[str, Any] = {
        "confidence": CONFIDENCE,
        "likeness": {name: share_interval(sum(flags), len(flags)) for name, flags in taken.items()},
    }
    if "adapter" in taken and "prompted_base" in taken:
        section["likeness_adapter_minus_prompted_base"] = paired_difference(
            [float(x) for x in taken["adapter"]], [float(x) for x in taken["prompted_base"]]
        )
    tuned, prompted = relevance.get("adapter"), relevance.get("prompted_base")
    if tuned is not None and prompted is not None:
        section["relevance_adapter_minus_prompted_base"] = paired_difference(tuned, prompted)
    return section


def describe(difference: dict[str, Any] | None, form: str) -> str:
    """ "+0.650 [+0.400, +0.850]" (`form`: the figure's format), "+0.000 [too few replies]" without an
    interval, "-" without a difference."""
    if not difference:
        return "-"
    if difference["interval"] is None:
        return f"{difference['mean']:{form}} [too few replies]"
    low, high = difference["interval"]
    return f"{difference['mean']:{form}} [{low:{form}}, {high:{form}}]"
