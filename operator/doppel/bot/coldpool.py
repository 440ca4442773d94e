"""The bot when the model pool is cold: no vLLM pod ready (the autoscaler took it to zero, or it is down).

A mention then gets, at once, one short note in its thread saying the doppel is waking up and about when
it will answer; the mention is held durably (`doppel.bot.held`: it survives a restart, and its count is the
metric `doppel_bot_mentions_waiting` that wakes the pool); once a pod is ready it is answered, exactly once,
by whichever replica takes it. One not answered `wake_deadline_s` after it was written gets an apology
instead. The estimate is the last wake-up this replica measured (first held mention to a ready pool), else
the configured `wake_estimate_s`.

Everything here runs on the answer worker's loop (`Deps.worker`): the probe's HTTP client, the posting
locks and the model slots live there. `Waker.run` only ticks from the serving loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx

from doppel.bot.held import HeldMention, HeldStore, held_mention
from doppel.bot.logic import Tenant

if TYPE_CHECKING:
    from slack_sdk.web.async_client import AsyncWebClient

    from doppel.bot.deps import Deps

LOG = logging.getLogger(__name__)
# A ready pool answers /health in milliseconds; a Service with no ready pod refuses the connection (or,
# with some proxies, never completes it).
PROBE_TIMEOUT = httpx.Timeout(connect=2.0, read=3.0, write=3.0, pool=3.0)
# Read per mention, a probe would add a round trip to each; a ready answer is trusted this long.
READY_TTL_S = 5.0
# With nothing held here, the records are still listed this often (other replicas', a restart's).
IDLE_LIST_S = 30.0


def waking_note(doppel: str, estimate_s: float) -> str:
    return (
        f"{doppel}'s doppel is waking up (its model server was asleep): "
        f"I'll answer here in about {_duration(estimate_s)}."
    )


def late_apology(doppel: str, waited_s: float) -> str:
    return (
        f"Sorry, {doppel}'s doppel could not wake up in time (no model server was ready after "
        f"{_duration(waited_s)}). Please ask again later."
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(5, round(seconds / 5) * 5):.0f} seconds"
    return f"{round(seconds / 60):.0f} minutes"


class PoolProbe:
    """Whether a model server answers `/health` (200) behind the URL the bot talks to."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._http: httpx.AsyncClient | None = None  # made on the worker's loop, used only there
        self._ready_until = 0.0

    async def ready(self, *, fresh: bool = False) -> bool:
        if not fresh and time.monotonic() < self._ready_until:
            return True
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.base_url, timeout=PROBE_TIMEOUT)
        try:
            ok = (await self._http.get("/health")).status_code == 200
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.PoolTimeout):
            ok = False  # nobody there: scaled to zero, or starting
        except httpx.TimeoutException:
            ok = True  # someone there, slow: the model call decides (and apologises if it must)
        self._ready_until = time.monotonic() + READY_TTL_S if ok else 0.0
        return ok


class ColdPool:
    """The cold-pool path of one bot: `hold` a mention, and `tick` to answer or apologise for held ones."""

    def __init__(
        self,
        probe: PoolProbe,
        store: HeldStore,
        *,
        estimate_s: float,
        deadline_s: float,
        poll_s: float,
    ) -> None:
        self.probe, self.store = probe, store
        self.estimate_s, self.deadline_s, self.poll_s = estimate_s, deadline_s, poll_s
        self.pending = threading.Event()  # something was held here: list at the next tick
        self._listed = 0.0

    async def hold(
        self,
        deps: Deps,
        post: Callable[[str], Awaitable[object]],
        tenant: Tenant,
        bot: tuple[str | None, str | None],
        event: dict[str, Any],
        doppel: str,
    ) -> None:
        """Record the mention, then tell its thread once (a mention held already is not told again)."""
        mention = held_mention(tenant, bot, event, doppel, self.deadline_s)
        if not await self.store.hold(mention):
            return
        self.pending.set()
        deps.metrics.held_one()
        await post(waking_note(doppel, self.estimate_s))

    async def tick(self, deps: Deps, client_for: Callable[[Tenant], Awaitable[AsyncWebClient | None]]) -> int:
        """One look at the held mentions: answer them if a pod is ready, apologise for the overdue ones.
        Returns how many were taken (answered or apologised for)."""
        now = time.monotonic()
        if not self.pending.is_set() and now - self._listed < IDLE_LIST_S:
            return 0
        self.pending.clear()
        self._listed = now
        held = await self.store.list()
        deps.metrics.held(len(held))
        if not held:
            return 0
        self.pending.set()  # keep looking every tick while anything is held
        ready = await self.probe.ready(fresh=True)
        if ready:
            self.estimate_s = max(1.0, time.time() - held[0].held_at)  # this wake-up, measured
        due = held if ready else [m for m in held if m.deadline <= time.time()]
        taken = await asyncio.gather(*(self._settle(deps, client_for, m, ready) for m in due))
        return sum(taken)

    async def _settle(
        self,
        deps: Deps,
        client_for: Callable[[Tenant], Awaitable[AsyncWebClient | None]],
        mention: HeldMention,
        ready: bool,
    ) -> bool:
        from doppel.bot.mentions import answer_mention, post_in_thread

        client = await client_for(mention.tenant)  # before taking it: a failure here loses nothing
        if not await self.store.take(mention.key):
            return False  # another replica has it
        if client is None:
            LOG.warning("held mention of team %s dropped: the workspace has no token", mention.tenant.team_id)
            return True
        if ready:
            await answer_mention(deps, client, mention.tenant, mention.bot, mention.event, hold=False)
        else:
            post = post_in_thread(deps, client, mention.tenant, mention.event)
            await post(late_apology(mention.doppel, time.time() - float(mention.event["ts"])))
        return True
