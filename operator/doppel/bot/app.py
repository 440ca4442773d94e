"""The Bolt app: @mentions answered in a doppel's voice, the /doppel command, consent buttons.

Glue only: parsing and wording live in `doppel.bot.logic`, Kubernetes calls in `doppel.bot.kube`, the model
behind the `Chat` callable (vLLM in production, any `doppel.serve.backend.ChatBackend` in local mode).
The server (`doppel.bot.server`) acknowledges an event as soon as its signature is checked and hands it to
Bolt on the `Worker` (its own thread and event loop), where the listener's answer runs too: Slack gets its
acknowledgement within 3 seconds whatever the model, the Slack API or Kubernetes do, even in a burst.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slack_bolt import BoltResponse
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization.async_authorize import AsyncAuthorize
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from doppel import api
from doppel.bot import logic
from doppel.bot.config import BotConfig
from doppel.bot.directory import Directory
from doppel.bot.kube import (
    ANNOTATION_ENTERPRISE,
    ANNOTATION_ORG_INSTALL,
    ANNOTATION_REQUESTER,
    LABEL_TEAM,
    AlreadyExists,
    token_secret,
)
from doppel.bot.ledger import EventLedger
from doppel.bot.logic import Tenant
from doppel.bot.metrics import BotMetrics
from doppel.bot.safety import neutralize, user_ids
from doppel.bot.snapshot import Snapshots
from doppel.bot.worker import Worker, slack_retry_handlers
from doppel.serve.backend import DEFAULT_PARAMS, ChatBackend, GenerationParams, Messages
from doppel.serve.errors import ServeError
from doppel.serve.vllm import AsyncVllmClient
from doppel.slack.conversation import DEFAULT_WINDOW, ThreadMessage, build_conversation, channel_window
from doppel.slack.normalize import UNKNOWN_USER, normalize_text, user_display_name
from doppel.slack.scrub import scrub_text

LOG = logging.getLogger(__name__)
CONSENT_ACTION = re.compile(r"^doppel_consent_(approve|decline)$")
DEFAULT_ICON = ":robot_face:"
MODEL_REQUESTS = 64
# A command's answer is the acknowledgement itself when it is ready this fast; Slack allows 3 s.
COMMAND_ACK_S = 1.5
# The training samples' default window (`doppel scrape --window-gap-minutes/--window-messages`).
WINDOW = DEFAULT_WINDOW
_MENTIONED = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")

# The one thing the bot needs from a model server: the reply of adapter `model` to `messages`.
Chat = Callable[[str, Messages], Awaitable[str]]


def vllm_chat(client: AsyncVllmClient, params: GenerationParams = DEFAULT_PARAMS) -> Chat:
    async def chat(model: str, messages: Messages) -> str:
        return await client.chat(model, messages, params)

    return chat


def backend_chat(backend: ChatBackend, params: GenerationParams = DEFAULT_PARAMS) -> Chat:
    """A sync `ChatBackend` (e.g. `doppel local`'s in-process one) as the bot's `Chat`, off the event loop."""

    async def chat(model: str, messages: Messages) -> str:
        return await asyncio.to_thread(backend.complete, model, messages, params)

    return chat


class Lookups:
    """users.info and conversations.info answers, kept a few minutes per workspace: names and channels
    rarely change, and a burst of mentions would otherwise ask the same questions for every event."""

    def __init__(self, ttl_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    async def user(self, client: AsyncWebClient, team_id: str, user_id: str) -> dict[str, Any]:
        """The user object, or {} when Slack does not know it."""
        return await self._get(("user", team_id, user_id), lambda: client.users_info(user=user_id), "user")

    async def channel(self, client: AsyncWebClient, team_id: str, channel_id: str) -> dict[str, Any]:
        fetch = lambda: client.conversations_info(channel=channel_id)  # noqa: E731
        return await self._get(("channel", team_id, channel_id), fetch, "channel")

    async def _get(
        self, key: tuple[str, str, str], fetch: Callable[[], Awaitable[Any]], field_name: str
    ) -> dict[str, Any]:
        if not key[2]:
            return {}
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        try:
            value = dict((await fetch())[field_name])
        except SlackApiError:
            return {}
        self._cache[key] = (now, value)
        return value


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
    snapshots: Snapshots = field(init=False)
    # One post at a time per channel: Slack allows about one message a second in a channel, so a burst of
    # replies queues here, each waiting out its 429s in turn, instead of all retrying at once.
    # At most this many model requests in flight from this replica; the rest wait (not counted in the
    # model timeout). An answer waiting for its channel's turn to post holds none.
    model_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MODEL_REQUESTS))
    _posting: weakref.WeakValueDictionary[str, asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary, init=False
    )

    def __post_init__(self) -> None:
        self.snapshots = Snapshots(self.kube)
        self.worker.on_error = self.metrics.failed

    def posting(self, channel: str) -> asyncio.Lock:
        """The lock of `channel`'s posts (the worker's loop only); gone once nobody waits on it."""
        lock = self._posting.get(channel)
        if lock is None:
            lock = asyncio.Lock()
            self._posting[channel] = lock
        return lock


def build_app(
    deps: Deps,
    *,
    client: AsyncWebClient,
    oauth_flow: AsyncOAuthFlow | None = None,
    authorize: AsyncAuthorize | None = None,
) -> AsyncApp:
    """The Bolt app. `client` carries the Slack API base URL and, in single-workspace mode, the bot token;
    `oauth_flow` selects multi-workspace mode."""
    config = deps.config
    app = AsyncApp(
        signing_secret=config.signing_secret,
        client=client,
        oauth_flow=oauth_flow,
        authorize=authorize,
        logger=LOG,
    )

    if oauth_flow is None:

        @app.middleware
        async def same_workspace(
            context: AsyncBoltContext, body: dict[str, Any], next: Callable[[], Awaitable[Any]]
        ) -> Any:
            """One bot token serves one workspace: a request naming another one anywhere (an org-wide
            envelope's `authorizations[0].team_id` is null, so every place counts) is refused."""
            owner = context.authorize_result.team_id if context.authorize_result else None
            others = _claimed_teams(context, body) - {owner}
            if owner and (others or context.is_enterprise_install):
                LOG.warning("request of team %s refused: this bot serves team %s", others, owner)
                # 200, not 403: Slack retries errors, and a refusal is an answer.
                return BoltResponse(status=200, body="This app serves another workspace.")
            return await next()

    @app.event("app_mention")
    async def on_mention(body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext) -> None:
        tenant = _tenant(context, body)
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
            if not await admitted(deps, client, tenant, body, event.get("user") or ""):
                if not event.get("user"):
                    return  # no person to tell
                await client.chat_postEphemeral(
                    channel=event["channel"],
                    user=event["user"],
                    thread_ts=event.get("thread_ts") or event["ts"],
                    text=logic.REFUSAL,
                )
                return
            await answer_mention(deps, client, tenant, context.bot_user_id, event)

        deps.worker.submit(work(), f"mention {event_id} of team {tenant.team_id}")

    @app.event("message")
    async def on_message() -> None:
        """Plain messages (edits, `message_changed`, bots' posts) are not for the bot: mentions come as
        `app_mention`. Acknowledging them keeps Bolt quiet."""

    @app.command("/doppel")
    async def on_command(ack: Any, respond: Any, command: dict[str, Any], context: AsyncBoltContext) -> None:
        tenant = _tenant(context, command)
        deps.metrics.event_received("command", tenant.team_id)

        async def result() -> str:
            # A command's answer is only ever seen by whoever ran it (ephemeral): refusals too.
            if not await admitted(deps, context.client, tenant, command, command.get("user_id") or ""):
                return logic.REFUSAL
            try:
                return await run_command(deps, context, tenant, command)
            except logic.CommandError as exc:
                return str(exc)

        task = asyncio.ensure_future(result())
        done, _ = await asyncio.wait({task}, timeout=COMMAND_ACK_S)
        if task in done:
            await ack(text=task.result())
            return
        # Kubernetes or Slack is slow today: acknowledge now, answer through the command's response_url.
        await ack(text="Working on it…")
        await respond(text=await task, response_type="ephemeral")

    @app.action(CONSENT_ACTION)
    async def on_consent(
        ack: Any, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        await ack()
        deps.worker.submit(answer_consent(deps, context, body, action), "consent answer")

    return app


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


def _claimed_teams(context: AsyncBoltContext, body: dict[str, Any]) -> set[str]:
    """Every workspace a request says it is of."""
    team = body.get("team")
    authorizations = body.get("authorizations") or [{}]
    named = {
        context.team_id,
        body.get("team_id"),
        team.get("id") if isinstance(team, dict) else team,
        authorizations[0].get("team_id"),
    }
    return {str(t) for t in named if t}


def _tenant(context: AsyncBoltContext, body: dict[str, Any]) -> Tenant:
    """The workspace of a verified request, which every object it touches is scoped to: the installation's
    own workspace, or, for an org-wide (Enterprise Grid) installation, the workspace the request comes
    from. Never the acting user's team: in a Slack Connect channel that is another organisation."""
    auth = context.authorize_result
    org_wide = bool(context.is_enterprise_install)
    team = auth.team_id if auth is not None and not org_wide else None
    if not team:
        authorizations = body.get("authorizations") or [{}]
        payload_team = body.get("team")
        team = (
            context.team_id
            or body.get("team_id")
            or (payload_team.get("id") if isinstance(payload_team, dict) else payload_team)
            or authorizations[0].get("team_id")
        )
    if not team:
        raise ValueError("request carries no team id")
    enterprise = (auth.enterprise_id if auth is not None else None) or context.enterprise_id
    return Tenant(str(team), enterprise, org_wide)


async def admitted(
    deps: Deps, client: AsyncWebClient, tenant: Tenant, body: dict[str, Any], user_id: str
) -> bool:
    """Whether `user_id` may use the tenant's doppels: a member of its workspace (or, for an org-wide
    install, of its org), by the payload's own team fields and by `users.info`."""
    foreign = logic.foreign_teams(body, tenant)
    user = await deps.lookups.user(client, tenant.team_id, user_id) if user_id and not foreign else {}
    if foreign or not logic.is_member(user, tenant):
        LOG.warning("user %s (teams %s) refused by team %s", user_id, foreign or user.get("team_id"), tenant)
        return False
    return True


# --- mentions ---------------------------------------------------------------------------------------------


SORRY_SLACK = (
    "Sorry, I couldn't answer this one (Slack or the cluster had a problem). Please try again in a minute."
)


async def answer_mention(
    deps: Deps, client: AsyncWebClient, tenant: Tenant, bot_user_id: str | None, event: dict[str, Any]
) -> None:
    """Answer a mention in its thread, or apologise there: a claimed mention is never left in silence."""
    channel, thread_ts = event["channel"], event.get("thread_ts") or event["ts"]

    async def post(text: str, **extra: Any) -> None:
        # link_names off: plain words like "@here" stay words (the text is neutralised anyway).
        async with deps.posting(channel):
            await client.chat_postMessage(
                channel=channel, thread_ts=thread_ts, text=text, link_names=False, **extra
            )
        deps.metrics.reply_posted(tenant.team_id, event["ts"])

    try:
        await _answer(deps, client, tenant, bot_user_id, event, post)
    except Exception:
        LOG.exception("mention in %s of team %s could not be answered", channel, tenant.team_id)
        await post(SORRY_SLACK)


async def _answer(
    deps: Deps,
    client: AsyncWebClient,
    tenant: Tenant,
    bot_user_id: str | None,
    event: dict[str, Any],
    post: Callable[..., Awaitable[None]],
) -> None:
    channel, thread_ts = event["channel"], event.get("thread_ts") or event["ts"]
    team_id = tenant.team_id
    namespace = deps.config.namespace_for(team_id)
    text = logic.strip_bot_mention(event.get("text", ""), bot_user_id)
    try:
        ref, rest = logic.pick_doppel(text)
    except logic.CommandError as exc:
        await post(str(exc))
        return
    doppel = logic.pick(await deps.snapshots.get(namespace, team_id), ref)
    if doppel is None:
        wanted = f"`{ref.handle or ref.user_id}`" if ref else "active"
        await post(f"There is no {wanted} doppel in this workspace yet: try `/doppel train @someone`.")
        return
    name = logic.handle_of(doppel)
    model = logic.served_name(doppel)
    if model is None:
        await post(logic.not_ready_reply(doppel))
        return
    target = doppel["spec"]["target"]
    person_id = target.get("userId") or ""
    lookups = deps.lookups

    async def user(user_id: str) -> dict[str, Any]:
        return await lookups.user(client, team_id, user_id)

    profile = (await user(person_id)).get("profile") or {}
    # Named as the training samples name the person: real name first.
    person = profile.get("real_name") or target.get("realName") or target.get("handle") or name
    try:
        if event.get("thread_ts"):
            replies = await client.conversations_replies(channel=channel, ts=thread_ts, limit=200)
            thread = replies.get("messages", [])
        else:
            # Outside a thread, the channel's recent messages cut by the window rule the samples were.
            recent = await client.conversations_history(
                channel=channel, latest=event["ts"], inclusive=True, limit=WINDOW.max_messages
            )
            flow = [m for m in recent.get("messages", []) if m.get("thread_ts") in (None, m["ts"])]
            thread = sorted(flow, key=lambda m: _ts(m["ts"]))
        if not any(m.get("ts") == event["ts"] for m in thread):
            thread.append(event)  # replies can lag behind the event: the question must be there
        context = await _thread(user, thread, event, rest, name, person_id, bot_user_id)
        if not event.get("thread_ts"):
            context = channel_window(context, WINDOW)
        channel_name = (await lookups.channel(client, team_id, channel)).get("name")
        messages = build_conversation(person, person_id, context, channel=channel_name)
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
    safe = await safe_reply(reply, user)
    for part in logic.split_reply(safe) or ["…"]:
        await post(part, username=f"{name}-bot", **icon)


async def safe_reply(reply: str, user: Callable[[str], Awaitable[dict[str, Any]]]) -> str:
    """The model's text as it may be posted: scrubbed of secrets and personal data (the same scrubber as
    the training samples), then mentions of people, channels and everyone made plain words (no ping, no bot
    ping-pong, no broadcast)."""
    reply = scrub_text(reply).text
    names = {}
    for user_id in user_ids(reply):
        found = await user(user_id)
        names[user_id] = user_display_name(found) if found else user_id
    return neutralize(reply, names)


async def _thread(
    lookup: Callable[[str], Awaitable[dict[str, Any]]],
    messages: Sequence[dict[str, Any]],
    mention: dict[str, Any],
    text: str,
    name: str,
    person_id: str,
    bot_user_id: str | None,
) -> list[ThreadMessage]:
    """The thread up to the mention, normalised as the training samples were: the doppel's own replies count
    as the person's, and the mention itself is read without its `as <user>` selector."""
    users: dict[str, str] = {}
    context: list[ThreadMessage] = []
    for message in messages:
        if _ts(message["ts"]) > _ts(mention["ts"]):
            break
        if message.get("bot_id"):
            if message.get("username") != f"{name}-bot":
                continue  # the bot's own notices, other doppels, other bots
            author_id = person_id
        else:
            author_id = message.get("user", "")
        raw = f"<@{bot_user_id}> {text}" if message["ts"] == mention["ts"] else message.get("text", "")
        for user_id in {author_id, *_MENTIONED.findall(raw)} - users.keys():
            found = await lookup(user_id)
            if found:
                users[user_id] = user_display_name(found)
        clean = scrub_text(normalize_text(raw, users, None, bot_user_id)).text  # as the samples were
        if clean:
            author = users.get(author_id, UNKNOWN_USER)
            context.append(ThreadMessage(author_id, author, clean, float(message["ts"])))
    return context


def _ts(ts: str) -> tuple[int, int]:
    seconds, _, micros = ts.partition(".")
    return int(seconds), int(micros or 0)


# --- /doppel ----------------------------------------------------------------------------------------------


async def run_command(deps: Deps, context: AsyncBoltContext, tenant: Tenant, command: dict[str, Any]) -> str:
    parsed = logic.parse_command(command.get("text", ""))
    team_id = tenant.team_id
    namespace = deps.config.namespace_for(team_id)
    kube = deps.kube
    if parsed.verb == "help":
        return logic.HELP
    if parsed.verb == "list":
        doppels = await kube.list_doppels(namespace, team_id)
        if not doppels:
            return "No doppels in this workspace yet: `/doppel train @someone`."
        active = (await kube.get_state(namespace, team_id)).get("active")
        lines = [
            logic.describe(d) + (" (active)" if d["metadata"]["name"] == active else "") for d in doppels
        ]
        return "\n".join(lines)
    client = context.client
    if parsed.verb == "status" and parsed.user is None:
        active = (await kube.get_state(namespace, team_id)).get("active")
        doppel = await kube.get_doppel(namespace, team_id, active) if active else None
        return logic.describe(doppel) if doppel else "No active doppel: `/doppel switch @someone`."
    assert parsed.user is not None
    user_id, handle = await _resolve(deps, client, tenant, parsed.user)
    name = logic.object_name(handle, team_id)
    if parsed.verb == "train":
        return await _train(deps, context, tenant, user_id, handle, command)
    doppel = await kube.get_doppel(namespace, team_id, name)
    if doppel is None:  # one applied by hand may be named otherwise: find it by its person
        listed = await kube.list_doppels(namespace, team_id)
        doppel = next((d for d in listed if logic.target_of(d) == user_id), None)
    if doppel is None:
        return f"There is no doppel of {handle}: `/doppel train @{handle}`."
    name = doppel["metadata"]["name"]
    if parsed.verb == "status":
        return logic.describe(doppel)
    if parsed.verb == "switch":
        await kube.set_state(namespace, team_id, {"active": name})
        deps.snapshots.invalidate(namespace, team_id)
        return f"{handle}'s doppel now answers mentions in this workspace."
    # forget: the person themself, or whoever asked for the doppel.
    requester = command["user_id"]
    allowed = {user_id, (doppel["metadata"].get("annotations") or {}).get(ANNOTATION_REQUESTER)}
    if requester not in allowed:
        return f"Only {handle} or whoever trained this doppel can make me forget it."
    await kube.delete_doppel(namespace, name)
    deps.snapshots.invalidate(namespace, team_id)
    if (await kube.get_state(namespace, team_id)).get("active") == name:
        await kube.set_state(namespace, team_id, {"active": ""})
    return f"Forgot {handle}'s doppel: its adapter and data are being deleted."


async def _resolve(deps: Deps, client: AsyncWebClient, tenant: Tenant, ref: logic.UserRef) -> tuple[str, str]:
    """(user id, handle) of a named member of the tenant's workspace; CommandError when there is none
    (a doppel is only ever of a member: never of a Slack Connect user of another organisation)."""
    if ref.user_id:
        user = await deps.lookups.user(client, tenant.team_id, ref.user_id)
        if not user:
            raise logic.CommandError(f"no Slack user <@{ref.user_id}> in this workspace")
        if not logic.is_member(user, tenant):
            raise logic.CommandError(
                f"<@{ref.user_id}> is not a member of this workspace: doppels are only of its own members"
            )
        return str(user["id"]), str(user.get("name") or ref.handle or user["id"])
    wanted = (ref.handle or "").lower()
    cursor = None
    while True:
        page = await client.users_list(limit=200, cursor=cursor)
        for user in page.get("members", []):
            names = {user.get("name"), (user.get("profile") or {}).get("display_name")}
            if wanted in {n.lower() for n in names if n} and logic.is_member(user, tenant):
                return str(user["id"]), str(user.get("name") or wanted)
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            raise logic.CommandError(f"no Slack user @{ref.handle} in this workspace")


async def _train(
    deps: Deps,
    context: AsyncBoltContext,
    tenant: Tenant,
    user_id: str,
    handle: str,
    command: dict[str, Any],
) -> str:
    team_id = tenant.team_id
    namespace = deps.config.namespace_for(team_id)
    name = logic.object_name(handle, team_id)
    existing = await deps.kube.get_doppel(namespace, team_id, name)
    if existing is not None:
        return f"{handle} already has a doppel: {logic.describe(existing)}"
    if await _at_limit(deps, namespace, team_id):
        return _limit_text(deps)
    requester = command["user_id"]
    if requester == user_id or not deps.config.require_consent:
        return await create_doppel(deps, context, tenant, user_id, handle, requester)
    request = {"team": tenant.team_id, "target": user_id, "handle": handle, "requester": requester}
    value = json.dumps(request, separators=(",", ":"))
    # Asked privately, in a direct message: the command may come from a DM (no channel the bot can post
    # in) or a channel the bot is not in, and whether someone agrees is nobody else's business.
    try:
        await tell(
            context.client,
            user_id,
            text=f"<@{user_id}>, <@{requester}> would like to train a doppel of you. Do you agree?",
            blocks=[
                {
                    "type": "section",
                    "text": {
                        "type": "mrkdwn",
                        "text": f"<@{user_id}>, <@{requester}> would like to train a doppel of you on your "
                        "Slack messages. It will answer mentions in your voice. Do you agree?",
                    },
                },
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "style": "primary",
                            "text": {"type": "plain_text", "text": "Approve"},
                            "action_id": "doppel_consent_approve",
                            "value": value,
                        },
                        {
                            "type": "button",
                            "style": "danger",
                            "text": {"type": "plain_text", "text": "Decline"},
                            "action_id": "doppel_consent_decline",
                            "value": value,
                        },
                    ],
                },
            ],
        )
    except SlackApiError as exc:
        error = exc.response.get("error") if exc.response is not None else None
        raise logic.CommandError(f"I could not ask <@{user_id}> in a direct message ({error}).") from None
    return f"Asked <@{user_id}> for their approval; I will tell you in a direct message when they answer."


async def tell(client: AsyncWebClient, user_id: str, text: str, **extra: Any) -> None:
    """A direct message from the bot to `user_id` (conversations.open, then chat.postMessage)."""
    opened = await client.conversations_open(users=user_id)
    await client.chat_postMessage(channel=opened["channel"]["id"], text=text, **extra)


async def create_doppel(
    deps: Deps,
    context: AsyncBoltContext,
    tenant: Tenant,
    user_id: str,
    handle: str,
    requester: str,
) -> str:
    config = deps.config
    team_id = tenant.team_id
    namespace = config.namespace_for(team_id)
    name = logic.object_name(handle, team_id)
    if await _at_limit(deps, namespace, team_id):  # checked again: approvals arrive later
        return _limit_text(deps)
    # Each workspace's token in a Secret of its own: the scrape Job reads only its own team's.
    secret = token_secret(config.token_secret, team_id)
    if context.bot_token:
        await deps.kube.put_secret(namespace, secret, {"token": context.bot_token}, team_id)
    annotations = {ANNOTATION_REQUESTER: requester}
    if tenant.enterprise_id:  # where the progress notifier finds the installation's token
        annotations[ANNOTATION_ENTERPRISE] = tenant.enterprise_id
    if tenant.org_wide:
        annotations[ANNOTATION_ORG_INSTALL] = "true"
    # Set only when known: an unset field keeps the CRD's default (exclude_unset below).
    profile = config.new_doppel_rate_profile()
    rate_profile = {"rate_profile": profile} if profile else {}
    spec = api.DoppelUserSpec(
        slack=api.Slack(team_id=team_id, token_secret_ref=api.SecretKeyRef(name=secret), **rate_profile),
        target=api.Target(user_id=user_id, handle=handle),
        base_model=api.BaseModelRef(served_name=config.base_model_name, path=config.base_model_path),
    )
    body = {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {LABEL_TEAM: team_id},
            "annotations": annotations,
        },
        # Only what was set: everything else gets the same defaults as an object applied with kubectl
        # (the CRD's, and the operator's --train-defaults for scheduling), never a copy frozen here.
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
    }
    try:
        await deps.kube.create_doppel(namespace, body)
        deps.snapshots.invalidate(namespace, team_id)
    except AlreadyExists:
        return f"{handle} already has a doppel: `/doppel status @{handle}`."
    return (
        f"Training a doppel of {handle}: I will tell you its progress in a direct message "
        f"(`/doppel status @{handle}`)."
    )


async def _at_limit(deps: Deps, namespace: str, team_id: str) -> bool:
    return len(await deps.kube.list_doppels(namespace, team_id)) >= deps.config.max_doppels_per_workspace


def _limit_text(deps: Deps) -> str:
    limit = deps.config.max_doppels_per_workspace
    return f"This workspace has reached its limit of {limit} doppels: `/doppel forget` one first."


async def answer_consent(
    deps: Deps, context: AsyncBoltContext, body: dict[str, Any], action: dict[str, Any]
) -> None:
    request = json.loads(action["value"])
    tenant, clicker = _tenant(context, body), body["user"]["id"]
    client = context.client
    # The button travels through Slack: only the named person, a member of the same workspace, can answer
    # it. Refusals go to the clicker alone (ephemeral, where they clicked): a shared channel's other
    # company sees nothing.
    clicked_in = (body.get("channel") or {}).get("id") or ""
    if not await admitted(deps, client, tenant, body, clicker):
        await client.chat_postEphemeral(channel=clicked_in, user=clicker, text=logic.REFUSAL)
        return
    if request["team"] != tenant.team_id or clicker != request["target"]:
        LOG.warning("consent answer by %s of team %s refused", clicker, tenant.team_id)
        await client.chat_postEphemeral(
            channel=clicked_in, user=clicker, text=f"Only <@{request['target']}> can answer this."
        )
        return
    if CONSENT_ACTION.match(action["action_id"]).group(1) == "decline":  # type: ignore[union-attr]
        text = f"<@{clicker}> declined; no doppel of them will be trained."
    else:
        result = await create_doppel(deps, context, tenant, clicker, request["handle"], request["requester"])
        text = f"<@{clicker}> approved. {result}"
    await tell(client, request["requester"], text)
