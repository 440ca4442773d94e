"""What the bot's listeners talk to (`Deps`): configuration, the doppels' directory, the event ledger, the
model (`Chat`) and its cold-pool path, the worker, Slack look-ups (`Lookups`, cached), metrics, and the
per-channel posting locks. Tests and `doppel local` build their own.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot.chat import Chat
from doppel.bot.coldpool import ColdPool
from doppel.bot.config import BotConfig
from doppel.bot.directory import Directory
from doppel.bot.ledger import EventLedger
from doppel.bot.memories import FeedbackDir, Memories, data_root_feedback
from doppel.bot.metrics import BotMetrics
from doppel.bot.snapshot import Snapshots
from doppel.bot.worker import Worker

MODEL_REQUESTS = 64
# The errors by which Slack says it does not know the user or channel asked about: an answer ({}, kept like
# any other). Any other error (internal_error, ratelimited, a 5xx, a revoked token) is Slack failing to
# answer, never "not a member": it is raised, and nothing is kept.
UNKNOWN = {
    "user": frozenset({"user_not_found", "users_not_found", "user_not_visible"}),
    "channel": frozenset({"channel_not_found"}),
}


class Lookups:
    """users.info and conversations.info answers, kept a few minutes per workspace: names and channels
    rarely change, and a burst of mentions would otherwise ask the same questions for every event. Single
    flight: the question is cached as soon as it is asked, so simultaneous mentions wait for one answer
    instead of each asking (and meeting Slack's rate limit). Slack failing to answer raises (`UNKNOWN`)."""

    def __init__(self, ttl_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, str, str], tuple[float, asyncio.Future[dict[str, Any]]]] = {}

    async def user(self, client: AsyncWebClient, team_id: str, user_id: str) -> dict[str, Any]:
        """The user object, or {} when Slack does not know it; raises when Slack fails to answer."""
        return await self._get(("user", team_id, user_id), lambda: client.users_info(user=user_id), "user")

    async def channel(self, client: AsyncWebClient, team_id: str, channel_id: str) -> dict[str, Any]:
        fetch = lambda: client.conversations_info(channel=channel_id)  # noqa: E731
        return await self._get(("channel", team_id, channel_id), fetch, "channel")

    async def workspace_url(self, client: AsyncWebClient, team_id: str) -> str | None:
        """The workspace's address (auth.test's `url`), which permalinks start with; None if unknown."""
        key = ("workspace", team_id, team_id)
        cached = self._cache.get(key)
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1].get("url")
        try:
            answer = await client.auth_test()
        except SlackApiError:
            return None
        self._cache[key] = (time.monotonic(), {"url": answer.get("url")})
        return answer.get("url")

    async def _get(
        self, key: tuple[str, str, str], fetch: Callable[[], Awaitable[Any]], field_name: str
    ) -> dict[str, Any]:
        if not key[2]:
            return {}
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and now - cached[0] < self.ttl_s:
            asked = cached[1]
            if asked.done() and not asked.cancelled() and asked.exception() is None:
                return dict(asked.result())
            # Commands are answered on the server's loop, mentions on the worker's: a question in flight
            # on the other loop cannot be awaited here, so this one asks too (rare).
            if not asked.done() and asked.get_loop() is asyncio.get_running_loop():
                try:
                    return dict(await asyncio.shield(asked))
                except asyncio.CancelledError:
                    if not asked.cancelled():
                        raise  # this caller was cancelled, not the one asking
                except Exception:
                    pass  # the asker's call failed (a dropped connection): ask again here
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._cache[key] = (now, answer)
        try:
            answer.set_result(await _ask(fetch, field_name))
        except BaseException as exc:  # the next asker (and any waiting) tries again
            if self._cache.get(key, (0, None))[1] is answer:
                del self._cache[key]
            if isinstance(exc, asyncio.CancelledError):
                answer.cancel()
            else:
                answer.set_exception(exc)
                answer.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        return dict(answer.result())


async def _ask(fetch: Callable[[], Awaitable[Any]], field_name: str) -> dict[str, Any]:
    try:
        return dict((await fetch())[field_name])
    except SlackApiError as exc:
        data = exc.response.data if exc.response is not None else None
        if isinstance(data, dict) and data.get("error") in UNKNOWN[field_name]:
            return {}  # Slack does not know it: the same for a few minutes
        raise


@dataclass
class Deps:
    """What the app talks to; tests and `doppel local` build their own."""

    config: BotConfig
    kube: Directory  # Kubernetes (`Kube`) or in memory (`MemoryDirectory`)
    ledger: EventLedger
    chat: Chat
    worker: Worker = field(default_factory=Worker)  # where answers run, off the acknowledging loop
    lookups: Lookups = field(default_factory=lambda: Lookups())
    metrics: BotMetrics = field(default_factory=lambda: BotMetrics(enabled=False))
    # (team, Grid org) pairs whose doppels know their org (`doppel.bot.doppels.adopt_org`).
    orgs_adopted: set[tuple[str, str]] = field(default_factory=set)
    # Mentions that find no model server ready are held for one (None: the model is always there).
    cold: ColdPool | None = None
    snapshots: Snapshots = field(init=False)
    # Where a doppel's feedback is kept; by default under the config's data root (none: no feedback).
    feedback_dir: FeedbackDir | None = None
    memories: Memories = field(init=False)
    # At most this many model requests in flight from this replica; the rest wait (not counted in the
    # model timeout). An answer waiting for its channel's turn to post holds none.
    model_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MODEL_REQUESTS))
    # One post at a time per channel: Slack allows about one message a second in a channel, so a burst of
    # replies queues here, each waiting out its 429s in turn, instead of all retrying at once.
    _posting: weakref.WeakValueDictionary[str, asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary, init=False
    )

    def __post_init__(self) -> None:
        self.snapshots = Snapshots(self.kube)
        self.memories = Memories(self.feedback_dir or data_root_feedback(self.config.data_root))
        self.worker.on_error = self.metrics.failed

    def posting(self, channel: str) -> asyncio.Lock:
        """The lock of `channel`'s posts (the worker's loop only); gone once nobody waits on it."""
        lock = self._posting.get(channel)
        if lock is None:
            lock = asyncio.Lock()
            self._posting[channel] = lock
        return lock
