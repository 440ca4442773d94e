"""spec.retrainSchedule and spec.timeZone: read as CronJob reads them, refused at admission when invalid."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from tests.unit.test_api import GOOD

from doppel.api import DoppelUserSpec, DoppelUserStatus
from doppel.crd import crd_manifest
from doppel.operator.schedule import next_time, previous_time, retrain_due, with_next_time


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
        ("0 9 * * MON-FRI", "2026-01-04T12:00", "2026-01-02T09:00"),  # Sunday -> Friday
    ],
)
def test_previous_scheduled_time(schedule, now, expected):
    assert previous_time(schedule, at(now)) == at(expected)


def test_time_zone_moves_the_schedule_like_a_cronjob_time_zone():
    # 03:00 in Paris is 02:00 UTC in winter, 01:00 UTC in summer; in Kolkata 21:30 UTC the day before.
    assert previous_time("0 3 * * *", at("2026-01-07T10:00"), "Europe/Paris") == at("2026-01-07T02:00")
    assert previous_time("0 3 * * *", at("2026-07-07T10:00"), "Europe/Paris") == at("2026-07-07T01:00")
    assert next_time("0 3 * * *", at("2026-01-07T10:00"), "Asia/Kolkata") == at("2026-01-07T21:30")
    assert next_time("0 3 * * *", at("2026-01-07T10:00")) == at("2026-01-08T03:00")


def test_retrain_is_due_only_after_a_scheduled_time_passed_since_training():
    assert not retrain_due("@daily", None, at("2026-01-07T10:00"))  # the first training is not scheduled
    assert not retrain_due("@daily", at("2026-01-07T00:10"), at("2026-01-07T23:59"))
    assert retrain_due("@daily", at("2026-01-07T00:10"), at("2026-01-08T00:00"))
    assert not retrain_due("0 0 29 2 *", at("2026-01-01T00:00"), at("2026-12-31T00:00"))  # no Feb 29 in 2026
    # Midnight in New York is 05:00 UTC: not yet due at 04:00 UTC.
    assert not retrain_due("@daily", at("2026-01-07T06:00"), at("2026-01-08T04:00"), "America/New_York")
    assert retrain_due("@daily", at("2026-01-07T06:00"), at("2026-01-08T05:00"), "America/New_York")


def test_next_schedule_time_is_in_the_status_while_ready():
    spec = DoppelUserSpec.model_validate({**GOOD["spec"], "retrainSchedule": "0 3 * * *", "timeZone": "UTC"})
    ready = with_next_time(DoppelUserStatus(phase="Ready"), spec, at("2026-01-07T10:00"))
    dumped = ready.model_dump(mode="json", by_alias=True)
    assert dumped["nextScheduleTime"] == "2026-01-08T03:00:00Z"
    assert (
        with_next_time(DoppelUserStatus(phase="Training"), spec, at("2026-01-07T10:00")).next_schedule_time
        is None
    )
    unscheduled = DoppelUserSpec.model_validate({**GOOD["spec"], "retrainSchedule": None})
    assert with_next_time(ready, unscheduled, at("2026-01-07T10:00")).next_schedule_time is None


def _cel_rule() -> dict[str, str]:
    spec = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    [rule] = spec["properties"]["retrainSchedule"]["x-kubernetes-validations"]
    return rule


@pytest.mark.parametrize(
    "bad", ["weekly", "61 * * * *", "* * * *", "0 0 32 * *", "0 24 * * *", "1-x * * * *", "0 0 * 13 *"]
)
def test_bad_schedules_are_refused_at_admission_with_a_clear_message(bad):
    rule = _cel_rule()
    # What the API server runs (RE2; this expression is the same in Python's re).
    regex = re.fullmatch(r"self\.matches\('(.*)'\)", rule["rule"]).group(1)
    assert "\\" not in regex and not re.match(regex, bad)
    assert "five fields" in rule["message"] and "@daily" in rule["message"]
    spec = copy.deepcopy(GOOD["spec"]) | {"retrainSchedule": bad}
    with pytest.raises(ValidationError, match="five fields"):
        DoppelUserSpec.model_validate(spec)


@pytest.mark.parametrize(
    "good", ["0 3 * * 1", "*/15 * * * *", "@daily", "0 9 * * mon-fri", "0 0 1 jan,jul ?"]
)
def test_good_schedules_pass_admission(good):
    regex = re.fullmatch(r"self\.matches\('(.*)'\)", _cel_rule()["rule"]).group(1)
    assert re.match(regex, good)
    assert DoppelUserSpec.model_validate({**GOOD["spec"], "retrainSchedule": good}).retrain_schedule == good


def test_a_step_of_zero_passes_the_pattern_but_not_the_model():
    with pytest.raises(ValidationError, match="step"):
        DoppelUserSpec.model_validate({**GOOD["spec"], "retrainSchedule": "*/0 * * * *"})


def test_unknown_time_zone_is_refused():
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        DoppelUserSpec.model_validate({**GOOD["spec"], "timeZone": "Mars/Olympus"})
    assert (
        DoppelUserSpec.model_validate({**GOOD["spec"], "timeZone": "Europe/Paris"}).time_zone
        == "Europe/Paris"
    )
