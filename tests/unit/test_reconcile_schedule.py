"""spec.retrainSchedule: cron parsing and when a retrain is due."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from doppel.operator.schedule import Cron, retrain_due


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("schedule", "now", "expected"),
    [
        ("0 3 * * 1", "2026-01-07T10:00", "2026-01-05T03:00"),  # Wednesday -> Monday 03:00
        ("*/15 * * * *", "2026-01-07T10:44:59", "2026-01-07T10:30"),
        ("@daily", "2026-01-07T00:00", "2026-01-07T00:00"),
        ("@monthly", "2026-03-15T12:00", "2026-03-01T00:00"),
        ("30 9 1,15 * *", "2026-01-14T09:00", "2026-01-01T09:30"),
        ("0 0 13 * 5", "2026-02-12T00:00", "2026-02-06T00:00"),  # day 13 OR a Friday (cron semantics)
        ("0 12 * * 7", "2026-01-05T00:00", "2026-01-04T12:00"),  # 7 is Sunday too
    ],
)
def test_previous_scheduled_time(schedule, now, expected):
    assert Cron.parse(schedule).previous(at(now)) == at(expected)


@pytest.mark.parametrize(
    "bad", ["weekly", "61 * * * *", "* * * *", "0 0 32 * *", "*/0 * * * *", "1-x * * * *"]
)
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        Cron.parse(bad)


def test_retrain_is_due_only_after_a_scheduled_time_passed_since_training():
    assert not retrain_due("@daily", None, at("2026-01-07T10:00"))  # the first training is not scheduled
    assert not retrain_due("@daily", at("2026-01-07T00:10"), at("2026-01-07T23:59"))
    assert retrain_due("@daily", at("2026-01-07T00:10"), at("2026-01-08T00:00"))
    assert not retrain_due("0 0 29 2 *", at("2026-01-01T00:00"), at("2026-12-31T00:00"))  # no Feb 29 in 2026
