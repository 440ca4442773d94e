"""The fidelity gate's rule: worse beyond a documented tolerance on any headline figure refuses promotion."""

from doppel.train.gate import regressions

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
