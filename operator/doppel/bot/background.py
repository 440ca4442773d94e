"""What the bot runs beside serving Slack: the progress notifier (a direct message to whoever asked for a
doppel when it reaches Training, Ready or Failed), the sweeper of expired event claims, and the waker of
mentions held for a cold model pool (`doppel.bot.coldpool`). None is ever on the way of a mention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot import logic
from doppel.bot.consent import tell
from doppel.bot.kube import (
    ANNOTATION_ENTERPRISE,
    ANNOTATION_NOTIFIED,
    ANNOTATION_ORG_INSTALL,
    ANNOTATION_REQUESTER,
    LABEL_TEAM,
    Kube,
)
from doppel.bot.ledger import EventLedger
from doppel.bot.logic import Tenant
from doppel.bot.worker import slack_retry_handlers

if TYPE_CHECKING:
    from doppel.bot.server import Bot

LOG = logging.getLogger(__name__)


async def sweep_claims(ledger: EventLedger, interval_s: float) -> None:
    """Delete expired event claims every `interval_s`, forever."""
    while True:
        try:
            gone = await ledger.sweep()
            LOG.debug("swept %d expired claims", gone)
        except Exception as exc:
            LOG.warning("claim sweeper: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)


async def wake_held(bot: Bot) -> None:
    """Every `wake_poll_s`, one tick of the cold pool on the answer worker (its HTTP clients, posting locks
    and model slots live there); a tick still running is not doubled."""
    cold, worker = bot.deps.cold, bot.deps.worker
    if cold is None:
        return
    running = threading.Event()

    async def client_for(tenant: Tenant) -> AsyncWebClient | None:
        token = await bot.token_for(tenant)
        if token is None:
            return None
        return AsyncWebClient(
            token=token,
            base_url=bot.app.client.base_url,
            session=worker.session(),
            retry_handlers=slack_retry_handlers(),
        )

    async def tick() -> None:
        try:
            await cold.tick(bot.deps, client_for)
        finally:
            running.clear()

    while True:
        if not running.is_set():
            running.set()
            worker.submit(tick(), "held mentions")
        await asyncio.sleep(cold.poll_s)


async def notify_progress(bot: Bot) -> None:
    """Tell whoever asked for a doppel when it reaches Training, Ready or Failed, in a direct message. A
    pass runs whenever a DoppelUser changes (a Kubernetes watch wakes it) and every `poll_interval_s`
    anyway; the phase told is recorded on the object, so a restart does not repeat it."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    stop_watch = None
    if isinstance(bot.deps.kube, Kube):
        stop_watch = bot.deps.kube.watch_doppels(lambda: loop.call_soon_threadsafe(changed.set))
    try:
        while True:
            changed.clear()  # before the pass: a change during it wakes the next one
            try:
                await notify_once(bot)
            except Exception as exc:
                LOG.warning("progress notifier: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), bot.config.poll_interval_s)
    finally:
        if stop_watch is not None:
            stop_watch()


async def notify_once(bot: Bot) -> int:
    """One pass over the doppels the bot created; returns how many messages were posted."""
    posted = 0
    for doppel in await bot.deps.kube.list_all_doppels():
        meta = doppel["metadata"]
        annotations = meta.get("annotations") or {}
        team_id = (meta.get("labels") or {}).get(LABEL_TEAM)
        requester = annotations.get(ANNOTATION_REQUESTER)
        phase = logic.phase(doppel)
        note = logic.progress_note(doppel)
        if not (team_id and requester and note) or annotations.get(ANNOTATION_NOTIFIED) == phase:
            continue
        # Only a workspace's own doppels, in its own namespace, may speak to that workspace.
        if logic.team_of(doppel) != team_id or meta.get("namespace") != bot.config.namespace_for(team_id):
            continue
        org_wide = annotations.get(ANNOTATION_ORG_INSTALL) == "true"
        token = await bot.token_for(Tenant(team_id, annotations.get(ANNOTATION_ENTERPRISE), org_wide))
        if token is None:
            # Said, not skipped silently: made before an org-wide install, the doppel learns its org from
            # the workspace's next request (`adopt_org`).
            LOG.warning(
                "no installation of team %s for %s's progress; told once it is known", team_id, meta["name"]
            )
            continue
        # Several replicas run this loop: the ledger's atomic claim lets exactly one of them post.
        version = ((doppel.get("status") or {}).get("adapter") or {}).get("version")
        key = f"progress/{meta['namespace']}/{meta['name']}/{meta.get('generation')}/{version}/{phase}"
        if not await bot.deps.ledger.claim(team_id, key):
            continue
        client = AsyncWebClient(
            token=token, base_url=bot.app.client.base_url, retry_handlers=slack_retry_handlers()
        )
        await tell(client, requester, note)
        await bot.deps.kube.annotate_doppel(meta["namespace"], meta["name"], {ANNOTATION_NOTIFIED: phase})
        posted += 1
    return posted


@contextlib.asynccontextmanager
async def in_background(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run `work` as a task while the block runs; cancel it when the block ends."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
