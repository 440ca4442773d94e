"""The mention path: an `app_mention` claimed once (the ledger), its author admitted, then answered in its
thread in the doppel's voice: the doppel picked, the thread (or the channel's recent window) read and
normalised as the training samples were, the model asked, its reply made safe (`safe_reply`) and posted
under the person's name, or an apology posted: a claimed mention is never left in silence.

Who is heard (docs/security.md): in a channel shared with another organisation the doppels stay silent
(the asker alone is told) unless the chart allows it; messages of people outside the workspace never enter
the prompt; a deactivated person's doppel answers only that it no longer speaks. The doppel's own earlier
turns are the posts of this app's bot (its bot ID) under the doppel's name, never a name alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot import logic
from doppel.bot.access import admitted, tenant_of
from doppel.bot.config import BotConfig
from doppel.bot.deps import Deps
from doppel.bot.doppels import adopt_org
from doppel.bot.feedback import reply_blocks, source_days
from doppel.bot.kube import ANNOTATION_DEACTIVATED
from doppel.bot.ledger import EventLedger
from doppel.bot.logic import Tenant
from doppel.bot.safety import neutralize, user_ids
from doppel.bot.worker import DEADLINE, slack_retry_handlers
from doppel.memory.attribution import drawn_on
from doppel.memory.prompt import recall_for
from doppel.memory.voice import abstention
from doppel.serve.errors import ServeError
from doppel.slack.conversation import (
    DEFAULT_BUDGET_CHARS,
    DEFAULT_WINDOW,
    PACE_MESSAGES,
    ThreadMessage,
    answered_message,
    build_conversation,
    fit_context,
    quoted_text,
    serving_context,
)
from doppel.slack.normalize import UNKNOWN_USER, normalize_text, user_display_name
from doppel.slack.scrub import message_regions, scrub_text

LOG = logging.getLogger(__name__)
DEFAULT_ICON = ":robot_face:"
# The training samples' default window (`doppel scrape --window-gap-minutes/--window-messages`).
WINDOW = DEFAULT_WINDOW
_MENTIONED = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")
SORRY_SLACK = (
    "Sorry, I couldn't answer this one (Slack or the cluster had a problem). Please try again in a minute."
)
SORRY_RATE_LIMITED = (
    "Sorry, Slack is limiting how fast I may read this conversation right now, so I couldn't answer in "
    "time. Please try again in a minute."
)
# conversations.replies pages at most this many (Slack caps it at 15 for a non-Marketplace app).
REPLIES_PAGE = 200
# Slack's rate limits are waited out (`Retry-After`) until this long after the mention arrived; then the
# person gets an apology that says why rather than a late answer.
MENTION_DEADLINE_S = 90.0
# A thread's later pages (conversations.replies) are waited for at most this long each: past it, the
# mention is answered from the pages read and the mention itself. A distributed app outside the Marketplace
# may read one page of 15 a minute, so a thread of 31 replies or more would otherwise always end in an
# apology, and one of 16 in a minute's silence.
LATER_PAGE_WAIT_S = 20.0


def on_mention(deps: Deps, body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext) -> None:
    """Hand a verified mention to the worker: claimed, admitted, answered there."""
    tenant = tenant_of(context, body)
    event_id = str(body.get("event_id") or "")
    deps.metrics.event_received("app_mention", tenant.team_id)
    if logic.from_a_bot(event, context.bot_user_id):
        LOG.info("mention %s of team %s ignored: written by a bot", event_id, tenant.team_id)
        return
    # Keyed on the message, not the event id: an edited mention is a new event of the same message.
    key = logic.mention_key(event)

    async def work() -> None:
        if not await claim(deps.ledger, tenant.team_id, key):
            deps.metrics.event_deduplicated("app_mention")
            LOG.info("mention %s (%s) of team %s already answered", key, event_id, tenant.team_id)
            return
        client = _worker_client(deps, context)

        async def admit() -> str | None:
            """Why this mention is refused, or None (then the tenant's Grid org is adopted)."""
            if not await admitted(deps, client, tenant, body, event.get("user") or ""):
                return logic.REFUSAL
            if not deps.config.allow_shared_channels and await _shared(deps, client, tenant, body, event):
                return logic.SHARED_CHANNEL
            await adopt_org(deps, tenant)
            return None

        bot = (context.bot_user_id, context.bot_id)
        if not await answer_mention(deps, client, tenant, bot, event, admit=admit):
            await release(deps.ledger, tenant.team_id, key)

    deps.worker.submit(work(), f"mention {event_id} of team {tenant.team_id}")


async def _shared(
    deps: Deps, client: AsyncWebClient, tenant: Tenant, body: dict[str, Any], event: dict[str, Any]
) -> bool:
    """Whether the mention's channel is shared with another organisation: the envelope says so
    (`is_ext_shared_channel`), or `conversations.info` does."""
    if body.get("is_ext_shared_channel"):
        return True
    return logic.is_shared_channel(await deps.lookups.channel(client, tenant.team_id, event["channel"]))


async def claim(ledger: EventLedger, team_id: str, key: str, attempts: int = 3) -> bool:
    """The ledger's claim, retried (a busy API server times out); if the ledger stays unreachable the
    mention counts as new: a rare duplicate answer beats leaving a person without one."""
    for attempt in range(attempts):
        try:
            return await ledger.claim(team_id, key)
        except Exception as exc:
            LOG.warning("claim of %s failed (attempt %d): %s: %s", key, attempt + 1, type(exc).__name__, exc)
            if attempt + 1 < attempts:
                await asyncio.sleep(0.5 * 2**attempt)
    return True


async def release(ledger: EventLedger, team_id: str, key: str) -> None:
    """Give back the claim of a mention that was not answered, so that asking again (its edit, Slack's
    redelivery) is answered rather than taken for a duplicate."""
    try:
        await ledger.release(team_id, key)
    except Exception as exc:
        LOG.warning("claim of %s not released: %s: %s", key, type(exc).__name__, exc)


def _worker_client(deps: Deps, context: AsyncBoltContext) -> AsyncWebClient:
    """The request's Slack client (its workspace's token), over the worker's kept-alive connections."""
    client = context.client
    return AsyncWebClient(
        token=client.token,
        base_url=client.base_url,
        timeout=client.timeout,
        session=deps.worker.session(),
        retry_handlers=slack_retry_handlers(),
        logger=client.logger,
    )


def post_in_thread(
    deps: Deps, client: AsyncWebClient, tenant: Tenant, event: dict[str, Any]
) -> Callable[..., Awaitable[str | None]]:
    """`post(text, **extra)`: a message in the mention's thread, one post at a time per channel."""
    channel, thread_ts = event["channel"], event.get("thread_ts") or event["ts"]

    async def post(text: str, **extra: Any) -> str | None:
        # link_names off: plain words like "@here" stay words (the text is neutralised anyway). Unfurling
        # off: a doppel's link must not fetch and show a page in the channel.
        async with deps.posting(channel):
            posted = await client.chat_postMessage(
                channel=channel,
                thread_ts=thread_ts,
                text=text,
                link_names=False,
                unfurl_links=False,
                unfurl_media=False,
                **extra,
            )
        deps.metrics.reply_posted(tenant.team_id, event["ts"])
        return posted.get("ts")

    return post


def post_to_author(client: AsyncWebClient, event: dict[str, Any]) -> Callable[..., Awaitable[str | None]]:
    """`post(text)`: an ephemeral message in the mention's thread that only its author sees."""

    async def post(text: str, **_: Any) -> str | None:
        await client.chat_postEphemeral(
            channel=event["channel"],
            user=event["user"],
            thread_ts=event.get("thread_ts") or event["ts"],
            text=text,
        )
        return None

    return post


async def answer_mention(
    deps: Deps,
    client: AsyncWebClient,
    tenant: Tenant,
    bot: tuple[str | None, str | None],
    event: dict[str, Any],
    *,
    hold: bool = True,
    admit: Callable[[], Awaitable[str | None]] | None = None,
) -> bool:
    """Answer a mention in its thread, or apologise there: a claimed mention is never left in silence.
    `bot`: this app's bot user ID and bot ID. `admit`: the admission of a new mention (why it is refused,
    or None); until it has passed, a refusal or an apology goes to the author alone (ephemeral: in a shared
    channel the other company sees nothing). With `hold`, a mention that finds the model pool cold is
    held for it instead (`doppel.bot.coldpool`); a held mention, answered later, is not held again.
    Returns False when it failed before posting anything but an apology: the mention may be asked again."""
    channel = event["channel"]
    thread_post = post_in_thread(deps, client, tenant, event)
    posted = False

    async def post(text: str, **extra: Any) -> str | None:
        nonlocal posted
        ts = await thread_post(text, **extra)
        posted = True
        return ts

    speak = post if admit is None else post_to_author(client, event)

    deadline = DEADLINE.set(time.monotonic() + MENTION_DEADLINE_S)
    try:
        refusal = await admit() if admit is not None else None
        if refusal is None:
            speak = post
            await _answer(deps, client, tenant, bot, event, post, hold)
        elif event.get("user"):  # else no person to tell
            await speak(refusal)
    except Exception as exc:
        partly = posted  # part of an answer went out: asking again would repeat it
        limited = isinstance(exc, SlackApiError) and exc.response.status_code == 429
        LOG.exception("mention in %s of team %s could not be answered", channel, tenant.team_id)
        deps.metrics.error("slack_rate_limited" if limited else "mention_failed")
        DEADLINE.reset(deadline)  # the apology may wait for its turn to post
        try:
            await speak(SORRY_RATE_LIMITED if limited else SORRY_SLACK)
        except Exception as lost:
            # Nobody told: counted (by kind too), so a lost mention never goes unnoticed.
            LOG.exception(
                "mention in %s of team %s lost: not even an apology posted", channel, tenant.team_id
            )
            deps.metrics.error("mention_lost")
            deps.metrics.failed(lost)
        return partly
    DEADLINE.reset(deadline)
    return True


async def _answer(
    deps: Deps,
    client: AsyncWebClient,
    tenant: Tenant,
    bot: tuple[str | None, str | None],
    event: dict[str, Any],
    post: Callable[..., Awaitable[str | None]],
    hold: bool = True,
) -> None:
    bot_user_id = bot[0]
    channel, thread_ts = event["channel"], event.get("thread_ts") or event["ts"]
    team_id = tenant.team_id
    namespace = deps.config.namespace_for(team_id)
    text = logic.strip_bot_mention(event.get("text", ""), bot_user_id)
    snapshot = await deps.snapshots.get(namespace, team_id)
    try:
        ref, rest = logic.pick_doppel(text, snapshot.doppels)
    except logic.CommandError as exc:
        await post(str(exc))
        return
    doppel = logic.pick(snapshot, ref)
    if doppel is None:
        wanted = f"`{ref.handle or ref.user_id}`" if ref else "active"
        await post(f"There is no {wanted} doppel in this workspace yet: try `/doppel train @someone`.")
        return
    name = logic.handle_of(doppel)
    model = logic.served_name(doppel)
    if model is None:
        await post(logic.not_ready_reply(doppel))
        return
    if hold and deps.cold is not None and not await deps.cold.probe.ready():
        await deps.cold.hold(deps, post, tenant, bot, event, name)
        return
    target = doppel["spec"]["target"]
    person_id = target.get("userId") or ""
    lookups = deps.lookups

    async def user(user_id: str) -> dict[str, Any]:
        return await lookups.user(client, team_id, user_id)

    found = await user(person_id)
    if found.get("deleted"):
        # Deactivated: the person left. Their doppel says so, once marked for admins to forget it.
        await _mark_deactivated(deps, doppel)
        await post(f"{name}'s doppel no longer answers: {name} has left this workspace.")
        return
    profile = found.get("profile") or {}
    # Named as the training samples name the person: real name first.
    person = profile.get("real_name") or target.get("realName") or target.get("handle") or name
    regions = message_regions(
        deps.config.phone_regions, found.get("tz"), (await user(event.get("user") or "")).get("tz")
    )
    try:
        if event.get("thread_ts"):
            thread = await read_thread(client, channel, thread_ts, event)
        else:
            # Outside a thread, the channel's recent messages cut by the window rule the samples were (enough
            # of them to read the channel's pace).
            recent = await client.conversations_history(
                channel=channel,
                latest=event["ts"],
                inclusive=True,
                limit=max(WINDOW.max_messages, PACE_MESSAGES),
            )
            flow = [m for m in recent.get("messages", []) if m.get("thread_ts") in (None, m["ts"])]
            thread = sorted(flow, key=lambda m: _ts(m["ts"]))
        if not any(m.get("ts") == event["ts"] for m in thread):
            thread.append(event)  # replies can lag behind the event: the question must be there
        said = await _thread(user, tenant, thread, event, rest, name, person_id, bot, deps.config)
        in_thread = bool(event.get("thread_ts"))
        context = serving_context(said, person_id, in_thread=in_thread, rule=WINDOW)
        context = _pin_quoted(context, said, person_id, mention_ts=float(event["ts"]), in_thread=in_thread)
        channel_name = (await lookups.channel(client, team_id, channel)).get("name")
        index = await deps.memories.index_for(doppel, team_id)
        # In a thread: a question's relatedness embeds it and scores every message (milliseconds at 100,000)
        recall = await asyncio.to_thread(recall_for, index, context, deps.config.memory)
        messages = build_conversation(person, person_id, context, channel=channel_name, memory=recall.lines())
        if recall.abstain and index is not None:
            reply = abstention(person, index.meta.get("voice"))  # nothing of theirs covers it: no guessing
        else:
            async with deps.model_slots:
                reply = await asyncio.wait_for(deps.chat(model, messages), deps.config.vllm_timeout_s)
    except (ServeError, TimeoutError) as exc:
        LOG.warning("no reply from %s for team %s: %s", model, team_id, exc)
        deps.metrics.error("vllm_unavailable")
        await post(
            f"Sorry, {name}'s doppel can't answer right now (the model server is unavailable). "
            "Please try again in a minute."
        )
        return
    icon = {"icon_url": profile["image_72"]} if profile.get("image_72") else {"icon_emoji": DEFAULT_ICON}
    safe = await safe_reply(reply, user, regions)
    parts = logic.split_reply(safe) or ["…"]
    # Only what the reply repeats is shown as its source: a message retrieved but not used backs nothing.
    cited = drawn_on(index, recall, reply, [m.text for m in context]) if index is not None else recall
    sources = cited.sources(await lookups.workspace_url(client, team_id)) if cited.hits else []
    store = deps.memories.store(deps.config.namespace_for(team_id), doppel)
    for part in parts[:-1]:
        await post(part, username=f"{name}-bot", **icon)
    # The last message carries the sources and, where feedback is kept, the feedback buttons.
    if store is None and not sources:
        await post(parts[-1], username=f"{name}-bot", **icon)
        return
    blocks = reply_blocks(parts[-1], doppel["metadata"]["name"], sources=sources, days=source_days(sources))
    if store is None:
        blocks = blocks[:2]  # text and sources: no buttons with nowhere to keep what they say
    reply_ts = await post(parts[-1], username=f"{name}-bot", blocks=blocks, **icon)
    if store is not None and reply_ts:
        record = {"messages": messages, "reply": safe, "adapter": model, "sources": sources}
        await asyncio.to_thread(store.record_reply, reply_ts, **record, abstained=recall.abstain)


async def read_thread(
    client: AsyncWebClient, channel: str, thread_ts: str, mention: dict[str, Any]
) -> list[dict[str, Any]]:
    """The thread up to the mention, root first: every page of conversations.replies up to it (`latest`,
    inclusive; Slack pages oldest first, so the messages just before the mention come last), of which the
    root, the message the mention quotes (`_quoted`) and the newest that the prompt's budget can hold are
    kept: a long thread is answered from its latest messages, in the memory of a page. A later page that
    Slack's rate limit holds back longer than LATER_PAGE_WAIT_S is not read: the pages before it are kept."""
    root: dict[str, Any] | None = None
    quoted: dict[str, Any] | None = None
    tail: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        try:
            page = await _replies_page(client, channel, thread_ts, mention["ts"], cursor)
        except SlackApiError as exc:
            if cursor is None or exc.response.status_code != 429:
                raise
            # Rate limited past LATER_PAGE_WAIT_S: the root and the first pages, then the mention (the
            # caller adds it), rather than an apology.
            LOG.info("thread %s of %s answered from its first pages: %s", thread_ts, channel, exc)
            page = {}
        replies: list[dict[str, Any]] = []
        for message in page.get("messages", []):
            if message.get("ts") == thread_ts:
                root = root or message  # Slack may repeat it on every page
            else:
                replies.append(message)
        # Searched before the budget drops anything: the quoted message may be the thread's oldest reply.
        quoted = _quoted([*([quoted] if quoted else []), *replies], mention) or quoted
        tail = _newest_within(tail + replies, DEFAULT_BUDGET_CHARS)
        cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
        if cursor is None:
            pinned = [root] if root else []
            if quoted is not None and all(m is not quoted for m in tail):
                pinned.append(quoted)  # older than every message of the tail
            return pinned + tail


async def _replies_page(
    client: AsyncWebClient, channel: str, thread_ts: str, latest: str, cursor: str | None
) -> dict[str, Any]:
    """One page of the thread up to `latest`; a later page (`cursor`) waits out rate limits for
    LATER_PAGE_WAIT_S at most, within the mention's own deadline."""
    bound = DEADLINE.get()
    if cursor is not None:
        later = time.monotonic() + LATER_PAGE_WAIT_S
        bound = later if bound is None else min(bound, later)
    token = DEADLINE.set(bound)
    try:
        page = await client.conversations_replies(
            channel=channel, ts=thread_ts, latest=latest, inclusive=True, limit=REPLIES_PAGE, cursor=cursor
        )
    finally:
        DEADLINE.reset(token)
    return dict(page.data) if isinstance(page.data, dict) else {}


def _quoted(messages: list[dict[str, Any]], mention: dict[str, Any]) -> dict[str, Any] | None:
    """The latest of `messages` (oldest first) holding the text `mention` quotes, found as the conversation
    rule finds it (`answered_message`), on texts read plain; None when it quotes none of them."""
    if not quoted_text(_plain(mention)):
        return None
    said = [ThreadMessage(str(m.get("user") or ""), "", _plain(m)) for m in messages]
    found = answered_message(said, ThreadMessage(str(mention.get("user") or ""), "", _plain(mention)))
    return next((m for m, s in zip(messages, said, strict=True) if s is found), None)


def _pin_quoted(
    context: list[ThreadMessage],
    said: Sequence[ThreadMessage],
    person_id: str,
    *,
    mention_ts: float,
    in_thread: bool,
) -> list[ThreadMessage]:
    """`context` with the message the mention (the last of `said`) quotes pinned in, however far back:
    `serving_context` pins what the reply itself would answer, and the reply answers the mention, whose
    quote says what it is about."""
    if not said or said[-1].ts != mention_ts:
        return context  # the mention itself said nothing that is kept
    quoted = answered_message(said[:-1], said[-1])
    if quoted is None or any(m.ts == quoted.ts for m in context):
        return context
    keep = 1 if in_thread and context else 0  # the thread's root stays pinned too
    return fit_context([*context[:keep], quoted], context[keep:], person_id, DEFAULT_BUDGET_CHARS)


def _plain(message: dict[str, Any]) -> str:
    return normalize_text(message.get("text") or "", {})


def _newest_within(messages: list[dict[str, Any]], budget_chars: int) -> list[dict[str, Any]]:
    """The newest of `messages` (oldest first) whose texts fit `budget_chars` together, the newest always:
    what `serving_context` could keep of them, at most."""
    used, start = 0, len(messages)
    while start > 0 and (
        start == len(messages) or used + len(messages[start - 1].get("text") or "") <= budget_chars
    ):
        start -= 1
        used += len(messages[start].get("text") or "")
    return messages[start:]


async def _mark_deactivated(deps: Deps, doppel: dict[str, Any]) -> None:
    meta = doppel["metadata"]
    if (meta.get("annotations") or {}).get(ANNOTATION_DEACTIVATED) != "true":
        await deps.kube.annotate_doppel(meta["namespace"], meta["name"], {ANNOTATION_DEACTIVATED: "true"})
        deps.snapshots.invalidate(meta["namespace"], logic.team_of(doppel) or "")


async def safe_reply(
    reply: str, user: Callable[[str], Awaitable[dict[str, Any]]], regions: Sequence[str] = ()
) -> str:
    """The model's text as it may be posted: scrubbed of secrets and personal data (the same scrubber as
    the training samples, phone numbers read in `regions` too), then mentions of people, channels and
    everyone made plain words (no ping, no bot ping-pong, no broadcast), masked links showing their target."""
    reply = scrub_text(reply, regions).text
    names = {}
    for user_id in user_ids(reply):
        found = await user(user_id)
        names[user_id] = user_display_name(found) if found else user_id
    return neutralize(reply, names)


async def _thread(
    lookup: Callable[[str], Awaitable[dict[str, Any]]],
    tenant: Tenant,
    messages: Sequence[dict[str, Any]],
    mention: dict[str, Any],
    text: str,
    name: str,
    person_id: str,
    bot: tuple[str | None, str | None],
    config: BotConfig,
) -> list[ThreadMessage]:
    """The thread up to the mention, normalised as the training samples were: the doppel's own replies count
    as the person's, and the mention itself is read without its `as <user>` selector. Messages of people
    outside the workspace (Slack Connect) are left out: another organisation never steers a doppel."""
    bot_user_id, bot_id = bot
    users: dict[str, str] = {}
    zones: dict[str, str | None] = {}
    outsiders: set[str] = set()
    context: list[ThreadMessage] = []
    for message in messages:
        if _ts(message["ts"]) > _ts(mention["ts"]):
            break
        if message.get("bot_id"):
            # Only this app's own posts under this doppel's name: another app can take any username.
            if not bot_id or message["bot_id"] != bot_id or message.get("username") != f"{name}-bot":
                continue  # the bot's own notices, other doppels, other bots
            author_id = person_id
        else:
            author_id = message.get("user", "")
            if message.get("user_team") not in (None, tenant.team_id) and not tenant.enterprise_id:
                continue  # Slack Connect: the message says its author's team
        # A quote right after the mention keeps its own line, as in the message: only so is it a quote.
        sep = "\n" if text.startswith("&gt;") else " "
        raw = f"<@{bot_user_id}>{sep}{text}" if message["ts"] == mention["ts"] else message.get("text", "")
        for user_id in {author_id, *_MENTIONED.findall(raw)} - users.keys():
            found = await lookup(user_id)
            if found:
                users[user_id] = user_display_name(found)
                zones[user_id] = found.get("tz")
                if not logic.is_member(found, tenant, guests=True, deactivated=True):
                    outsiders.add(user_id)
        if author_id in outsiders:
            continue
        regions = message_regions(config.phone_regions, zones.get(author_id), zones.get(person_id))
        clean = scrub_text(normalize_text(raw, users, None, bot_user_id), regions).text  # as the samples were
        if clean:
            author = users.get(author_id, UNKNOWN_USER)
            context.append(ThreadMessage(author_id, author, clean, float(message["ts"])))
    return context


def _ts(ts: str) -> tuple[int, int]:
    seconds, _, micros = ts.partition(".")
    return int(seconds), int(micros or 0)
