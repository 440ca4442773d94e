"""The fidelity gate's rule: worse beyond a documented tolerance on any headline figure refuses promotion."""

import random

from doppel.train.gate import Paired, mcnemar_worse, regressions

SERVING = {
    "heldout_loss_adapter": 2.0,
    "likeness_adapter": 0.6,
    "relevance_adapter": 0.1,
    "distinct_adapter": 0.9,
    "copy_rate_adapter": 0.0,
}


def test_within_tolerance_is_not_worse():
    near = {**SERVING, "heldout_loss_adapter": 2.03, "likeness_adapter": 0.54, "copy_rate_adapter": 0.06}
    assert regressions(near, SERVING) == []
    better = {**SERVING, "heldout_loss_adapter": 1.5, "likeness_adapter": 0.9}
    assert regressions(better, SERVING) == []


def test_each_figure_beyond_its_tolerance_is_named():
    worse = {
        "heldout_loss_adapter": 2.1,
        "likeness_adapter": 0.5,
        "relevance_adapter": 0.05,
        "distinct_adapter": 0.8,
        "copy_rate_adapter": 0.2,
    }
    assert regressions(worse, SERVING) == [
        "held-out loss 2.100 > 2.000 serving",
        "likeness 0.50 < 0.60 serving",
        "relevance 0.05 < 0.10 serving",
        "distinct 0.80 < 0.90 serving",
        "copy rate 0.20 > 0.00 serving",
    ]


def test_a_figure_missing_on_either_side_is_not_compared():
    assert regressions({"likeness_adapter": 0.1}, {"heldout_loss_adapter": 2.0}) == []


def test_reply_by_reply_a_reply_or_two_of_noise_is_not_a_regression():
    """Two adapters of one recipe differ by a reply or two; the paired test does not refuse on that, where
    the fixed tolerance (no per-reply figures) would."""
    new, serving = {"likeness_adapter": 0.75}, {"likeness_adapter": 0.875}
    assert regressions(new, serving) == ["likeness 0.75 < 0.88 serving"]
    person_serving = [True] * 14 + [False] * 2
    person_new = [False, False, False] + [True] * 11 + [True, False]  # 3 lost, 1 won: 12 of 16
    assert regressions(new, serving, Paired(person_new, person_serving)) == []


def test_reply_by_reply_many_replies_lost_is_a_regression():
    person_serving = [True] * 12 + [False] * 4
    person_new = [False] * 8 + [True] * 4 + [False] * 4  # 8 lost, none won
    paired = Paired(person_new, person_serving)
    worse = regressions({"likeness_adapter": 0.25}, {"likeness_adapter": 0.75}, paired)
    why = "8 replies no longer taken for the person's, 0 newly; p=0.004"
    assert worse == [f"likeness 0.25 < 0.75 serving ({why})"]
    assert mcnemar_worse(8, 0) == 1 / 256 and mcnemar_worse(7, 1) == 9 / 256 and mcnemar_worse(0, 0) == 1.0


def test_reply_by_reply_relevance_lower_on_most_replies_is_a_regression():
    rng = random.Random(0)
    serving = [rng.uniform(0.0, 0.2) for _ in range(20)]
    noisy = [s + rng.uniform(-0.02, 0.02) for s in serving]  # no direction: kept
    lower = [s - rng.uniform(0.01, 0.03) for s in serving]  # lower on each reply, 0.02 on average
    same = [True] * 20
    heads = ({"relevance_adapter": 0.1}, {"relevance_adapter": 0.11})
    assert regressions(*heads, Paired(same, same, noisy, serving)) == []
    (worse,) = regressions(*heads, Paired(same, same, lower, serving))
    assert worse.startswith("relevance 0.10 < 0.11 serving (lower reply by reply; p=0.000")
    assert regressions(*heads) == []  # within the fixed tolerance: only the paired test sees it
