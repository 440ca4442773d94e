"""The bot's lifecycle: `create_bot` builds it from its configuration (single-workspace with a bot token,
or multi-workspace OAuth), and `Bot` serves it, over HTTP (uvicorn: the intake, /healthz, /readyz, the
OAuth pages) or Socket Mode, with its background tasks (progress notifier, claim sweeper, held-mention
waker) beside it.

`doppel local --socket-mode` and the tests call `create_bot(config, chat=..., kube=...)` with their own
pieces; `doppel bot` calls it with everything from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from kubernetes import client as k8s
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization.async_authorize import AsyncInstallationStoreAuthorize
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.oauth.installation_store import InstallationStore
from slack_sdk.web.async_client import AsyncWebClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from doppel.bot import revocation
from doppel.bot.app import build_app
from doppel.bot.background import in_background, notify_progress, sweep_claims, wake_held
from doppel.bot.chat import Chat, vllm_chat
from doppel.bot.coldpool import ColdPool, PoolProbe
from doppel.bot.config import BotConfig
from doppel.bot.deps import Deps
from doppel.bot.directory import Directory
from doppel.bot.guard import GuardedHttpToolsProtocol
from doppel.bot.held import HeldStore, KubeHeldStore, MemoryHeldStore, SqlHeldStore
from doppel.bot.intake import Front, SlackIntake
from doppel.bot.kube import Kube, api_client
from doppel.bot.ledger import EventLedger, KubeEventLedger, MemoryEventLedger, SqlEventLedger
from doppel.bot.logic import Tenant
from doppel.bot.memories import FeedbackDir
from doppel.bot.metrics import BotMetrics
from doppel.bot.oauth import INSTALL_PATH, REDIRECT_PATH, oauth_wiring
from doppel.bot.redact import install_token_redaction
from doppel.bot.stores import AsyncInstallationStoreAdapter
from doppel.bot.worker import slack_retry_handlers
from doppel.serve.vllm import AsyncVllmClient, RetryPolicy

LOG = logging.getLogger(__name__)


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
            async with self.notifier(), self.sweeper(), in_background(wake_held(self)), self.restorer():
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
        return in_background(notify_progress(self))

    def sweeper(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Delete expired event claims every `sweep_interval_s`, in the background: never on the way of a
        mention."""
        return in_background(sweep_claims(self.deps.ledger, self.config.sweep_interval_s))

    def restorer(self) -> contextlib.AbstractAsyncContextManager[None]:
        """With one bot token (no OAuth, so no install to tell), resume at startup the doppels a revocation
        stopped, once Slack accepts the token (`revocation.on_start`), in the background."""
        if self.installation_store is not None:
            return contextlib.nullcontext()
        return in_background(revocation.on_start(self.deps, self.app.client))

    def server_config(self, host: str, port: int, **overrides: Any) -> uvicorn.Config:
        """uvicorn's configuration of the bot's HTTP server (`serve`; the tests serve the same)."""
        options: dict[str, Any] = {
            # httptools, not h11: its C parser halves the HTTP stack's share of each acknowledgement; with
            # a deadline and a size cap for request lines and headers (uvicorn has neither).
            "http": GuardedHttpToolsProtocol,
            "log_level": "info",
            "access_log": False,
            # An idle kept-alive connection is closed after this (uvicorn's default: 5 s).
            "timeout_keep_alive": 5,
            **overrides,
        }
        return uvicorn.Config(self.asgi(), host=host, port=port, **options)

    async def serve(self, host: str, port: int) -> None:
        _freeze_startup_objects()
        await _Server(self.server_config(host, port)).serve()

    async def serve_socket_mode(self) -> None:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        if not self.config.app_token:
            raise ValueError("Socket Mode needs SLACK_APP_TOKEN (an xapp- app-level token)")
        handler = AsyncSocketModeHandler(self.app, self.config.app_token, web_client=self.app.client)
        _freeze_startup_objects()
        self.serve_metrics()
        try:
            async with self.notifier(), self.sweeper(), in_background(wake_held(self)), self.restorer():
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
    feedback_dir: FeedbackDir | None = None,
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

    directory = kube if kube is not None else Kube(kube_client(), namespaces=config.watch_namespaces)
    if ledger is None:
        if config.database_url:
            ledger = SqlEventLedger(config.database_url, config.event_ttl_s)
        elif isinstance(directory, Kube):
            ledger = KubeEventLedger(directory, config.bot_namespace, config.event_ttl_s)
        else:
            ledger = MemoryEventLedger()
    cold: ColdPool | None = None
    if chat is None:
        timeout = httpx.Timeout(connect=5.0, read=config.vllm_timeout_s, write=30.0, pool=30.0)
        # Few retries: a person is waiting in the thread, and Slack shows nothing until we post.
        vllm = AsyncVllmClient(config.vllm_url, timeout=timeout, retry=RetryPolicy(attempts=2))
        chat = vllm_chat(vllm, config.generation())
        # A pool of vLLM pods may be scaled to zero: mentions are then held for it, durably.
        cold = ColdPool(
            PoolProbe(config.vllm_url),
            _held_store(config, directory),
            estimate_s=config.wake_estimate_s,
            deadline_s=config.wake_deadline_s,
            poll_s=config.wake_poll_s,
        )
    # Single-workspace mode: the client carries the one bot token (Bolt takes it from there).
    token = None if config.oauth else config.bot_token
    web = AsyncWebClient(
        base_url=config.slack_api_url or AsyncWebClient.BASE_URL,
        token=token,
        retry_handlers=slack_retry_handlers(),
    )
    deps = Deps(
        config=config,
        kube=directory,
        ledger=ledger,
        chat=chat,
        metrics=BotMetrics(config.metrics_port != 0),
        feedback_dir=feedback_dir,
        cold=cold,
    )
    store: AsyncInstallationStoreAdapter | None = None
    flow: AsyncOAuthFlow | None = None
    authorize: AsyncInstallationStoreAuthorize | None = None
    if config.oauth:
        reinstalled = functools.partial(revocation.on_installed, deps)
        store, flow, authorize = oauth_wiring(config, web, installation_store, kube_client, reinstalled)
    app = build_app(deps, client=web, oauth_flow=flow, authorize=authorize, installation_store=store)
    return Bot(config=config, deps=deps, app=app, installation_store=store)


def _held_store(config: BotConfig, directory: Directory) -> HeldStore:
    """Where held mentions are kept: beside the event ledger (the database, else Kubernetes, else memory)."""
    if config.database_url:
        return SqlHeldStore(config.database_url)
    if isinstance(directory, Kube):
        return KubeHeldStore(directory, config.bot_namespace)
    return MemoryHeldStore()
