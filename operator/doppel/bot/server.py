"""Wiring and serving: the Bolt app over HTTP (uvicorn, ASGI) with /healthz and /readyz, or Socket Mode;
single-workspace (bot token) or multi-workspace OAuth with installations in Kubernetes Secrets (or
slack_sdk's SQLAlchemy store when a database is configured); the progress notifier beside them.

`doppel local --socket-mode` and the tests call `create_bot(config, chat=..., kube=...)` with their own
pieces; `doppel bot` calls it with everything from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from kubernetes import client as k8s
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization.async_authorize import AsyncInstallationStoreAuthorize
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.oauth.installation_store import InstallationStore
from slack_sdk.web.async_client import AsyncWebClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from doppel.bot import logic
from doppel.bot.app import Chat, Deps, build_app, tell, vllm_chat
from doppel.bot.config import DEFAULT_SCOPES, BotConfig
from doppel.bot.directory import Directory
from doppel.bot.installation_store import KubernetesSecretInstallationStore
from doppel.bot.kube import (
    ANNOTATION_ENTERPRISE,
    ANNOTATION_NOTIFIED,
    ANNOTATION_ORG_INSTALL,
    ANNOTATION_REQUESTER,
    LABEL_TEAM,
    Kube,
    api_client,
)
from doppel.bot.ledger import EventLedger, KubeEventLedger, MemoryEventLedger, SqlEventLedger
from doppel.bot.logic import Tenant
from doppel.bot.metrics import BotMetrics
from doppel.bot.redact import install_token_redaction
from doppel.bot.stores import AsyncInstallationStoreAdapter, SignedOAuthStateStore
from doppel.bot.worker import slack_retry_handlers
from doppel.serve.backend import DEFAULT_PARAMS
from doppel.serve.vllm import AsyncVllmClient, RetryPolicy

LOG = logging.getLogger(__name__)
INSTALL_PATH, REDIRECT_PATH, EVENTS_PATH = "/slack/install", "/slack/oauth_redirect", "/slack/events"
# Slack's events, commands and interactions are a few kilobytes; anything this big is not from Slack.
MAX_BODY_BYTES = 1 << 20
# Slack's rule: a request older than 5 minutes is refused (replays).
MAX_REQUEST_AGE_S = 300


class BodyTooLarge(Exception):
    """The request's body is over the limit (from its Content-Length, or as it is read)."""


class Disconnected(Exception):
    """The client went away before its body was read."""


async def read_bounded(receive: Receive, declared: str, limit: int) -> bytes:
    """The body from ASGI `http.request` messages; BodyTooLarge as soon as it is known to exceed `limit`
    (from its declared Content-Length, before anything is read, or as it arrives: read no further)."""
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def signed(secret: bytes, headers: Mapping[str, str], body: bytes) -> bool:
    """Slack's request signature (`v0=` HMAC-SHA256 of `v0:<timestamp>:<body>`), fresh and valid, checked on
    the raw bytes: nothing of the body is decoded before it is known to come from Slack."""
    timestamp, signature = headers.get("x-slack-request-timestamp", ""), headers.get("x-slack-signature", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_REQUEST_AGE_S:
        return False
    digest = hmac.new(secret, b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(f"v0={digest}", signature)


def envelope(body: bytes, content_type: str) -> dict[str, Any] | None:
    """What Bolt will read: a JSON body's object, or a form's fields (its JSON `payload`, if it has one);
    None when Bolt could not read it (not UTF-8, not a JSON object)."""
    try:
        text = body.decode("utf-8")
        if content_type.startswith("application/json"):
            found = json.loads(text)
        else:
            form = urllib.parse.parse_qs(text, strict_parsing=bool(text))
            fields = {name: values[0] for name, values in form.items()}
            found = json.loads(fields["payload"]) if "payload" in fields else fields
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


async def answer(send: Send, status: int, text: str = "") -> None:
    """A plain-text response (or an empty one) straight on ASGI: no response object to build."""
    body = text.encode()
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SlackIntake:
    """POST /slack/events as a plain ASGI app, checked before Bolt sees it: bounded in size, signed (before
    anything in it is parsed), then well-formed; a bad one gets a one-line answer, not a traceback.

    An event needs nothing back but the 200, so it is answered at once and handed to `on_event` (Bolt's
    dispatch, on the worker). Commands and interactions go through Bolt before the response, which may
    carry their reply. Plain ASGI, not a Starlette route: in a burst of mentions each acknowledgement then
    costs no more than the bare HTTP stack's own (no routing, no request or response objects).
    """

    def __init__(
        self,
        secret: bytes,
        handler: AsyncSlackRequestHandler,
        on_event: Callable[[bytes, dict[str, str], str], None],
        acked: Callable[[float], None],
    ) -> None:
        self.secret = secret
        self.handler = handler
        self.on_event = on_event
        self.acked = acked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if scope["method"] != "POST":
            await answer(send, 405, "method not allowed")
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            body = await read_bounded(receive, headers.get("content-length", ""), MAX_BODY_BYTES)
        except BodyTooLarge:
            await answer(send, 413, "request body too large")
            return
        except Disconnected:
            return
        if not signed(self.secret, headers, body):
            await answer(send, 401, "invalid request signature")
            return
        content_type = headers.get("content-type", "")
        payload = envelope(body, content_type)
        if payload is None:
            await answer(send, 400, "malformed request body")
            return
        if content_type.startswith("application/json") and payload.get("type") == "event_callback":
            self.on_event(body, headers, f"event {payload.get('event_id')}")
            await answer(send, 200)
            self.acked(started)
            return

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        response = await self.handler.handle(Request(scope, replay))
        await response(scope, receive, send)
        self.acked(started)


class Front:
    """The ASGI entry: POST /slack/events to the intake, everything else to `rest` (Starlette); counts the
    requests being served, so the worker defers new work while `busy()`, and for `settle_s` after the last
    request: a burst is acknowledged before its mentions are answered."""

    def __init__(self, intake: ASGIApp, rest: ASGIApp, settle_s: float = 0.02) -> None:
        self.intake = intake
        self.rest = rest
        self.settle_s = settle_s
        self.serving = 0
        self.last_done = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.rest(scope, receive, send)
            return
        self.serving += 1
        try:
            app = self.intake if scope["path"] == EVENTS_PATH else self.rest
            await app(scope, receive, send)
        finally:
            self.serving -= 1
            self.last_done = time.monotonic()

    def busy(self) -> bool:
        """Read from the worker's thread: an int and a float, each read atomically."""
        return self.serving > 0 or time.monotonic() - self.last_done < self.settle_s


@dataclass
class Bot:
    """A configured bot: the Bolt app, its ASGI wrapper and what they use."""

    config: BotConfig
    deps: Deps
    app: AsyncApp
    installation_store: AsyncInstallationStoreAdapter | None

    async def token_for(self, tenant: Tenant) -> str | None:
        """The bot token of the tenant's workspace: the configured one, or its installation's (OAuth): the
        workspace's own, inside a Grid org or not, or its org's when the app is installed org-wide."""
        if self.installation_store is None:
            return self.config.bot_token
        found = await self.installation_store.async_find_installation(
            enterprise_id=tenant.enterprise_id,
            team_id=None if tenant.org_wide else tenant.team_id,
            is_enterprise_install=tenant.org_wide,
        )
        return found.bot_token if found else None

    def asgi(self) -> Front:
        handler = AsyncSlackRequestHandler(self.app)

        async def slack(request: Request) -> Response:
            return await handler.handle(request)

        def on_event(body: bytes, headers: dict[str, str], what: str) -> None:
            self.deps.worker.submit(self._dispatch(body, headers, what), what)

        async def healthz(request: Request) -> Response:
            return JSONResponse({"ok": True})

        async def readyz(request: Request) -> Response:
            try:
                await self.deps.kube.get_state(self.config.bot_namespace, "readyz")
            except Exception as exc:
                return JSONResponse({"ok": False, "reason": f"Kubernetes: {type(exc).__name__}"}, 503)
            return JSONResponse({"ok": True})

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            self.serve_metrics()
            async with self.notifier(), self.sweeper():
                yield
            await asyncio.to_thread(self.deps.worker.close)
            self.deps.metrics.close()

        routes = [
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ]
        if self.app.oauth_flow is not None:
            routes += [
                Route(INSTALL_PATH, slack, methods=["GET"]),
                Route(REDIRECT_PATH, slack, methods=["GET"]),
            ]
        intake = SlackIntake(self.config.signing_secret.encode(), handler, on_event, self.deps.metrics.acked)
        front = Front(intake, Starlette(routes=routes, lifespan=lifespan))
        self.deps.worker.busy = front.busy
        return front

    async def _dispatch(self, body: bytes, headers: dict[str, str], what: str) -> None:
        """Bolt's middleware and listeners for an event already acknowledged."""
        response = await self.app.async_dispatch(AsyncBoltRequest(body=body.decode(), headers=headers))
        if response.status >= 400 and response.status != 404:  # 404: an event no listener wants
            LOG.warning("%s: Bolt answered %d: %s", what, response.status, response.body[:200])

    def serve_metrics(self) -> None:
        """/metrics on its own port (apart from the Slack-facing one), unless metrics are off."""
        if self.config.metrics_port:
            self.deps.metrics.serve(self.config.metrics_port, self.config.metrics_addr)

    def notifier(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Run `notify_progress` in the background for as long as the block runs."""
        return _in_background(notify_progress(self))

    def sweeper(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Delete expired event claims and OAuth state claims every `sweep_interval_s`, in the
        background: never on the way of a mention."""

        async def sweep() -> None:
            while True:
                try:
                    gone = await self.deps.ledger.sweep()
                    LOG.debug("swept %d expired claims", gone)
                except Exception as exc:
                    LOG.warning("claim sweeper: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(self.config.sweep_interval_s)

        return _in_background(sweep())

    async def serve(self, host: str, port: int) -> None:
        _freeze_startup_objects()
        server = _Server(
            # httptools, not h11: its C parser halves the HTTP stack's share of each acknowledgement.
            uvicorn.Config(
                self.asgi(), host=host, port=port, http="httptools", log_level="info", access_log=False
            )
        )
        await server.serve()

    async def serve_socket_mode(self) -> None:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        if not self.config.app_token:
            raise ValueError("Socket Mode needs SLACK_APP_TOKEN (an xapp- app-level token)")
        handler = AsyncSocketModeHandler(self.app, self.config.app_token, web_client=self.app.client)
        _freeze_startup_objects()
        self.serve_metrics()
        try:
            async with self.notifier(), self.sweeper():
                await handler.start_async()
        finally:
            await handler.close_async()
            await asyncio.to_thread(self.deps.worker.close)
            self.deps.metrics.close()


def _freeze_startup_objects() -> None:
    """Keep what the imports and set-up made (modules, classes: most of the heap) out of the garbage
    collector's sight: otherwise each full collection walks all of it, a pause of 100-150 ms measured in
    a burst of mentions (about 10 ms after this)."""
    gc.collect()
    gc.freeze()


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully; a pod being stopped is no failure,
    so `doppel bot` returns normally instead (exit 0, as the CLI's exit-code contract says)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def create_bot(
    config: BotConfig,
    *,
    chat: Chat | None = None,
    kube: Directory | None = None,
    ledger: EventLedger | None = None,
    installation_store: InstallationStore | None = None,
    kube_server: str | None = None,
) -> Bot:
    """Build the bot from `config`; each piece left out is made from the configuration.

    `doppel local` passes `kube=MemoryDirectory()` (with its doppels added) and `chat=backend_chat(...)`:
    then nothing talks to Kubernetes, and events are deduplicated in memory (one process).
    """
    install_token_redaction()
    clients: list[k8s.ApiClient] = []

    def kube_client() -> k8s.ApiClient:
        if not clients:
            clients.append(api_client(kube_server))
        return clients[0]

    directory = kube if kube is not None else Kube(kube_client())
    if ledger is None:
        if config.database_url:
            ledger = SqlEventLedger(config.database_url, config.event_ttl_s)
        elif isinstance(directory, Kube):
            ledger = KubeEventLedger(directory, config.bot_namespace, config.event_ttl_s)
        else:
            ledger = MemoryEventLedger()
    if chat is None:
        timeout = httpx.Timeout(connect=5.0, read=config.vllm_timeout_s, write=30.0, pool=30.0)
        # Few retries: a person is waiting in the thread, and Slack shows nothing until we post.
        vllm = AsyncVllmClient(config.vllm_url, timeout=timeout, retry=RetryPolicy(attempts=2))
        chat = vllm_chat(vllm, DEFAULT_PARAMS.override(max_tokens=config.max_tokens))
    # Single-workspace mode: the client carries the one bot token (Bolt takes it from there).
    token = None if config.oauth else config.bot_token
    web = AsyncWebClient(
        base_url=config.slack_api_url or AsyncWebClient.BASE_URL,
        token=token,
        retry_handlers=slack_retry_handlers(),
    )
    deps = Deps(
        config=config, kube=directory, ledger=ledger, chat=chat, metrics=BotMetrics(config.metrics_port != 0)
    )
    store: AsyncInstallationStoreAdapter | None = None
    flow: AsyncOAuthFlow | None = None
    authorize: AsyncInstallationStoreAuthorize | None = None
    if config.oauth:
        assert config.client_secret is not None
        store = AsyncInstallationStoreAdapter(_installation_store(config, installation_store, kube_client))
        settings = AsyncOAuthSettings(
            client_id=config.client_id,
            client_secret=config.client_secret,
            scopes=list(DEFAULT_SCOPES),
            installation_store=store,
            state_store=SignedOAuthStateStore(config.client_secret, ledger),
            install_path=INSTALL_PATH,
            redirect_uri_path=REDIRECT_PATH,
            redirect_uri=config.oauth_redirect_uri,
            # Rotating tokens are refreshed this long before they expire (slack_sdk's TokenRotator).
            token_rotation_expiration_minutes=120,
        )
        flow = AsyncOAuthFlow(client=web, settings=settings)
        # Bolt's default authorize rotates tokens through a client of its own (slack.com): use ours.
        authorize = AsyncInstallationStoreAuthorize(
            installation_store=store,
            client_id=config.client_id,
            client_secret=config.client_secret,
            client=web,
            token_rotation_expiration_minutes=settings.token_rotation_expiration_minutes,
            logger=LOG,
        )
    app = build_app(deps, client=web, oauth_flow=flow, authorize=authorize)
    return Bot(config=config, deps=deps, app=app, installation_store=store)


def _installation_store(
    config: BotConfig, installation_store: InstallationStore | None, kube_client: Callable[[], k8s.ApiClient]
) -> InstallationStore:
    if installation_store is not None:
        return installation_store
    if config.database_url:
        import sqlalchemy as sa
        from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore

        engine = sa.create_engine(config.database_url)
        sql_store = SQLAlchemyInstallationStore(client_id=config.client_id or "", engine=engine)
        sql_store.create_tables()
        return sql_store
    return KubernetesSecretInstallationStore(kube_client(), config.bot_namespace)


# --- progress messages ----------------------------------------------------------------------------------


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
async def _in_background(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run `work` as a task while the block runs; cancel it when the block ends."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
