"""`spec.retrainSchedule` and `spec.timeZone`, read as a Kubernetes CronJob reads its schedule.

croniter does the cron arithmetic; this module only fixes what CronJob users expect: five fields or an
@-macro (validated in doppel.api), times in the given IANA time zone (default UTC), and a retrain that is
due once a scheduled time has passed since the last training.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from doppel.api import DoppelUserSpec, DoppelUserStatus


def _zone(time_zone: str | None) -> ZoneInfo:
    return ZoneInfo(time_zone or "UTC")


def previous_time(schedule: str, now: datetime, time_zone: str | None = None) -> datetime:
    """The latest scheduled time at or before `now`, in UTC."""
    # croniter's get_prev is strictly before its start: start a second later so `now` itself counts.
    start = now.astimezone(_zone(time_zone)).replace(microsecond=0) + timedelta(seconds=1)
    return croniter(schedule, start, day_or=True).get_prev(datetime).astimezone(UTC)


def next_time(schedule: str, now: datetime, time_zone: str | None = None) -> datetime:
    """The first scheduled time strictly after `now`, in UTC."""
    local = now.astimezone(_zone(time_zone))
    return croniter(schedule, local, day_or=True).get_next(datetime).astimezone(UTC)


def retrain_due(
    schedule: str, last_trained_at: datetime | None, now: datetime, time_zone: str | None = None
) -> bool:
    """True when a scheduled time has passed since the last training (never before a first training)."""
    if last_trained_at is None:
        return False
    return previous_time(schedule, now, time_zone) > last_trained_at


def with_next_time(status: DoppelUserStatus, spec: DoppelUserSpec, now: datetime) -> DoppelUserStatus:
    """`status` with nextScheduleTime: set while Ready on a schedule (retrains start only from Ready)."""
    due = None
    if spec.retrain_schedule and status.phase == "Ready":
        due = next_time(spec.retrain_schedule, now, spec.time_zone)
    if status.next_schedule_time == due:
        return status
    return status.model_copy(update={"next_schedule_time": due})
