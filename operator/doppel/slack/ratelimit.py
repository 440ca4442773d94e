"""Slack's per-method rate limits: the documented profiles and an adaptive budget that learns the real ones.

Slack limits each Web API method per workspace and app. Which limit applies depends on the kind of app:
an internal (single-workspace) app and a Slack Marketplace app get the documented tiers; since May 2025 a
distributed app outside the Marketplace gets 1 request per minute on conversations.history and
conversations.replies, with `limit` capped at 15. A `RateProfile` is the starting point; `Budget` spaces each
method's calls at that rate and learns from every 429 (its `Retry-After` and the time since the method's
last accepted call) how far apart calls must be, so it settles at what Slack allows without a storm.

One `Budget` serves every task of a scrape; with `share(path)` it keeps its figures in a small JSON file
under an exclusive lock, so concurrent scrapes of the same workspace (Jobs on a shared volume) draw on one
budget. Times there are wall-clock seconds, comparable across processes.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from doppel.fsutil import atomic_write_text

T = TypeVar("T")

# Documented per-minute limits: Tier 2 is 20, Tier 3 is 50, Tier 4 is 100 (auth.test is "special", at least
# that). Page sizes are what each method takes at most (history: 999, Slack recommends at most 200).
_TIERED = {
    "auth.test": 100.0,
    "users.list": 20.0,
    "conversations.list": 20.0,
    "conversations.join": 50.0,
    "conversations.history": 50.0,
    "conversations.replies": 50.0,
}
_PAGES = {
    "users.list": 200,
    "conversations.list": 200,
    "conversations.history": 200,
    "conversations.replies": 200,
}
# Spacing calls at the limit exactly invites 429s from network and clock jitter; keep a little under it.
HEADROOM = 0.95
# Nothing Slack documents is slower than Tier 1 (1 per minute): a learned interval never exceeds that
# (plus a second for Retry-After's rounding up to whole seconds).
SLOWEST_INTERVAL = 61.0


@dataclass(frozen=True)
class RateProfile:
    name: str
    per_minute: Mapping[str, float]
    page_size: Mapping[str, int]


_NON_MARKETPLACE_METHODS = ("conversations.history", "conversations.replies")
PROFILES = {
    "internal": RateProfile("internal", _TIERED, _PAGES),
    "marketplace": RateProfile("marketplace", _TIERED, _PAGES),
    "non-marketplace": RateProfile(
        "non-marketplace",
        {**_TIERED, **dict.fromkeys(_NON_MARKETPLACE_METHODS, 1.0)},
        {**_PAGES, **dict.fromkeys(_NON_MARKETPLACE_METHODS, 15)},
    ),
}
DEFAULT_PROFILE = "internal"


class Budget:
    """Per-method call budget of one workspace.

    `time_scale` compresses time (an emulator that runs N times faster than Slack): allowances are
    multiplied by it and the `Retry-After` seconds Slack states are divided by it."""

    def __init__(
        self,
        profile: RateProfile,
        time_scale: float = 1.0,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.profile = profile
        self.time_scale = time_scale
        self.on_wait = on_wait  # told (method, seconds) before each wait of a second or more
        self._memory: dict[str, dict[str, float]] = {}
        self._path: Path | None = None

    def share(self, path: Path) -> None:
        """From now on keep the figures in `path` (locked with `path`.lock), shared with other processes."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path

    def start_interval(self, method: str) -> float:
        return 60 / (self.profile.per_minute[method] * self.time_scale * HEADROOM)

    def page_size(self, method: str) -> int:
        return self.profile.page_size[method]

    async def turn(self, method: str) -> float:
        """Wait for `method`'s next slot; the wall-clock time the call goes out.

        Slots are reserved an interval apart, so the rate never exceeds the budget's. A call also goes only
        past any 429's `Retry-After` and, once Slack has refused an early call, only a full interval after
        the call before it really went (a sleep can wake late); until then the caller waits on, keeping its
        place."""
        now = time.time()
        slot = self._update(lambda methods: self._reserve(methods, method, now))
        while True:
            delay = slot - time.time()
            if delay > 0:
                if self.on_wait is not None and delay >= 1:
                    self.on_wait(method, delay)
                await asyncio.sleep(delay)
            sent = time.time()
            slot = self._update(lambda methods, sent=sent: self._go(methods, method, sent))
            if slot <= sent:
                return sent

    def accepted(self, method: str, sent: float) -> None:
        def record(methods: dict[str, Any]) -> None:
            entry = self._entry(methods, method, sent)
            entry["last_ok"] = max(entry["last_ok"], sent)

        self._update(record)

    def refused(self, method: str, sent: float, retry_after: float) -> float:
        """A 429 for a call sent at `sent` with Slack's `Retry-After` (Slack seconds): nobody calls `method`
        before then, and calls are spaced at least as far as this refusal shows. Returns the interval."""
        wait = retry_after / self.time_scale
        now = time.time()

        def learn(methods: dict[str, Any]) -> float:
            entry = self._entry(methods, method, now)
            entry["blocked"] = max(entry["blocked"], now + wait)
            entry["next"] = max(entry["next"], now + wait)
            entry["slack"] = 0.0  # Slack takes no call early: from now on none goes early
            if entry["last_ok"] > 0:
                # The last accepted call took the last token; the next one is `wait` after this refusal.
                # Calls spaced at exactly that meet 429s whenever one request travels faster than the one
                # before it, so the learned interval keeps the same headroom as the starting one.
                seen = (sent + wait - entry["last_ok"]) / HEADROOM
                entry["interval"] = min(max(entry["interval"], seen), SLOWEST_INTERVAL / self.time_scale)
            return float(entry["interval"])

        return self._update(learn)

    def _reserve(self, methods: dict[str, Any], method: str, now: float) -> float:
        entry = self._entry(methods, method, now)
        slot = max(now, entry["next"], entry["blocked"])
        entry["next"] = slot + entry["interval"]
        return float(slot)

    def _go(self, methods: dict[str, Any], method: str, now: float) -> float:
        """`now` if a call may go now (then it is recorded as sent), else the earliest time it may."""
        entry = self._entry(methods, method, now)
        earliest = max(entry["blocked"], entry["last_sent"] + entry["interval"] - entry["slack"])
        if earliest > now:
            return float(earliest)
        entry["last_sent"] = now
        entry["next"] = max(entry["next"], now + entry["interval"])
        return now

    def _entry(self, methods: dict[str, Any], method: str, now: float) -> dict[str, float]:
        start = self.start_interval(method)
        entry = methods.get(method)
        # Figures learned under another starting point (another profile or time scale) do not apply.
        if not isinstance(entry, dict) or entry.get("start") != start:
            entry = {"start": start, "interval": start, "next": now, "blocked": 0.0}
            # A call may follow the one before early by `slack` (until a 429 says Slack minds), so that one
            # sleep waking late does not push every later call back.
            entry |= {"last_sent": 0.0, "last_ok": 0.0, "slack": start / 2}
            methods[method] = entry
        return entry

    def _update(self, change: Callable[[dict[str, Any]], T]) -> T:
        if self._path is None:
            return change(self._memory)
        with open(self._path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                methods = json.loads(self._path.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                methods = {}
            if not isinstance(methods, dict):
                methods = {}
            result = change(methods)
            atomic_write_text(self._path, json.dumps(methods, sort_keys=True) + "\n")
            return result
