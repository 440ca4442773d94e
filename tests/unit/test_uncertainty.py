"""The fidelity report's intervals: what a difference of a few replies is worth."""

from __future__ import annotations

import random

import pytest

from doppel.train.fidelity import table
from doppel.train.uncertainty import paired_difference, report_section, share_interval


def test_a_share_of_few_replies_has_a_wide_interval_that_holds_it():
    low, high = share_interval(9, 18)
    assert low < 0.5 < high
    assert high - low > 0.35  # 18 replies cannot tell 0.5 from 0.7
    wide, narrow = share_interval(9, 18), share_interval(500, 1000)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 4
    assert share_interval(0, 18)[0] == 0.0 and share_interval(18, 18)[1] == 1.0
    assert share_interval(0, 0) is None


def test_a_consistent_gain_is_told_apart_from_noise():
    rng = random.Random(1)
    base = [rng.uniform(-0.05, 0.05) for _ in range(18)]
    better = [b + 0.1 + rng.uniform(-0.02, 0.02) for b in base]
    gain = paired_difference(better, base)
    assert gain["interval"][0] > 0 and gain["mean"] == pytest.approx(0.1, abs=0.02)
    # Differences that cancel out: as many replies a little better as a little worse.
    noisy = [b + (0.03 if i % 2 else -0.03) * rng.uniform(0.5, 1.5) for i, b in enumerate(base)]
    same = paired_difference(noisy, base)
    assert same["interval"][0] < 0 < same["interval"][1]
    assert paired_difference(noisy, base) == same  # a fixed seed: the same report gives the same interval


def test_equal_few_or_unpaired_sets():
    assert paired_difference([0.1] * 18, [0.1] * 18) == {"mean": 0.0, "interval": [0.0, 0.0]}
    # Three replies alike in both sets say nothing of a difference: the mean, no interval.
    assert paired_difference([1.0, 0.0, 0.0], [1.0, 0.0, 0.0]) == {"mean": 0.0, "interval": None}
    assert paired_difference([0.1, 0.2], [0.2]) is None
    assert paired_difference([], []) is None
    few = {"adapter": [True, False, False], "prompted_base": [True, False, False]}
    report = {"replies": 3, "likeness": {"adapter": 1 / 3, "prompted_base": 1 / 3, "real": 1.0}}
    report["uncertainty"] = report_section(few, {})
    assert "likeness +0.00 [too few replies]" in table(report)


def test_the_report_section_and_its_table_line():
    taken = {"adapter": [True] * 14 + [False] * 4, "prompted_base": [False] * 16 + [True] * 2}
    relevance = {"adapter": [0.01] * 18, "prompted_base": [0.02] * 18}
    section = report_section(taken, relevance)
    low, high = section["likeness"]["adapter"]
    assert low < 14 / 18 < high
    assert section["likeness_adapter_minus_prompted_base"]["interval"][0] > 0.3
    assert section["relevance_adapter_minus_prompted_base"] == {"mean": -0.01, "interval": [-0.01, -0.01]}
    report = {
        "heldout_samples": 24,
        "replies": 18,
        "likeness": {"adapter": 14 / 18, "prompted_base": 2 / 18, "real": 0.8, "classes": ["person", "b"]},
        "uncertainty": section,
    }
    gap = section["likeness_adapter_minus_prompted_base"]
    lo, hi = gap["interval"]
    expected = f"adapter - prompted  likeness {gap['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]  relevance -0.010"
    assert expected in table(report)
    assert "95% interval over 18 replies" in table(report)
