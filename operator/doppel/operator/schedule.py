"""Cron schedules for `spec.retrainSchedule`: when was the last scheduled time at or before now?

Standard five fields (minute hour day-of-month month day-of-week) with `*`, lists, ranges and steps, or
one of the @-macros. Day-of-month and day-of-week combine as in cron: when both are restricted, either
one matching is enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@hourly": "0 * * * *",
}
BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
# How far back to look for the previous scheduled time (a yearly schedule is the longest period).
HORIZON = timedelta(days=367)


def _field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"bad step in {part!r}")
        if base == "*":
            start, end = low, high
        elif "-" in base:
            start, end = (int(x) for x in base.split("-", 1))
        else:
            start = int(base)
            end = high if step_text else start
        if not low <= start <= end <= high:
            raise ValueError(f"{part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        """Parse a schedule; ValueError says what is wrong."""
        fields = MACROS.get(text.strip(), text).split()
        if len(fields) != 5:
            raise ValueError(f"{text!r}: want five fields (minute hour day month weekday) or an @-macro")
        parsed = [_field(f, lo, hi) for f, (lo, hi) in zip(fields, BOUNDS, strict=True)]
        weekdays = frozenset(d % 7 for d in parsed[4])  # 7 is Sunday too
        return cls(*parsed[:4], weekdays, fields[2] == "*", fields[4] == "*")

    def _day_matches(self, when: datetime) -> bool:
        if when.month not in self.months:
            return False
        day_ok = when.day in self.days
        weekday_ok = (when.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return day_ok and weekday_ok
        return day_ok or weekday_ok

    def previous(self, now: datetime) -> datetime | None:
        """The latest scheduled minute at or before `now` (within a year), or None."""
        when = now.replace(second=0, microsecond=0)
        limit = now - HORIZON
        while when > limit:
            if not self._day_matches(when):
                when = when.replace(hour=0, minute=0) - timedelta(minutes=1)  # end of the previous day
            elif when.hour not in self.hours:
                when = when.replace(minute=0) - timedelta(minutes=1)  # end of the previous hour
            elif when.minute not in self.minutes:
                when -= timedelta(minutes=1)
            else:
                return when
        return None


def retrain_due(schedule: str, last_trained_at: datetime | None, now: datetime) -> bool:
    """True when a scheduled time has passed since the last training (never before a first training)."""
    if last_trained_at is None:
        return False
    previous = Cron.parse(schedule).previous(now)
    return previous is not None and previous > last_trained_at
