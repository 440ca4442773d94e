"""Pytest fixtures: Bolt app fixtures (bot).

- `sign(body, secret, timestamp)`: the headers Slack sends, signed as Slack signs them
  (`v0=` HMAC-SHA256 of `v0:{timestamp}:{body}` with the signing secret);
- `mention_payload`, `command_form`, `action_form`: request bodies shaped like Slack's;
- `OAuthSlackEmulator`: the ingestion helper's `SlackEmulator` plus `oauth.v2.access` (code exchange and
  token rotation), authenticated with the app's client id and secret like Slack does, and `auth.revoke`;
- `bot_kube`: the kmock Kubernetes emulator with the resources the bot uses (DoppelUsers, ConfigMaps,
  Secrets), as `(kmock, url)`; ConfigMap lists honour label selectors, as a real API server's do;
- `BotHarness` / `bot_harness`: the real bot (`doppel.bot.server.create_bot`) served by uvicorn on
  127.0.0.1 in the test's event loop, with helpers to send signed requests and wait for Slack posts;
- `TcpGate`: a loopback TCP forwarder that can be closed and reopened, to take a real server "down".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import hmac
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import kmock as kmock_lib
import pytest_asyncio
import uvicorn

from doppel.api import LABEL_TEAM
from doppel.bot.config import BotConfig
from doppel.bot.kube import Kube, api_client, token_secret
from doppel.bot.logic import object_name
from doppel.bot.server import Bot, create_bot
from tests.support.slack_emulator import ApiError, SlackEmulator, Team
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID
from tests.support.vllm_fixtures import free_port

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TEAM_ID = "T0ACME001"
NAMESPACE = "doppel-t0acme001"
BOT_NAMESPACE = "doppel-system"
CHANNEL = "C01GENERAL"
CLIENT_ID, CLIENT_SECRET = "1111.2222", "oauth-client-secret-3333"


def sign(body: str | bytes, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(secret.encode(), f"v0:{ts}:".encode() + raw, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


def mention_payload(
    text: str,
    ts: str,
    *,
    event_id: str,
    user: str = "U02BOB",
    team: str = TEAM_ID,
    channel: str = CHANNEL,
    thread_ts: str | None = None,
    bot_user_id: str = BOT_USER_ID,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "app_mention",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return {
        "token": "legacy-verification-token",
        "team_id": team,
        "api_app_id": "A0DOPPEL",
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(float(ts)),
        "authorizations": [{"team_id": team, "user_id": bot_user_id, "is_bot": True}],
    }


def command_form(text: str, *, user: str, team: str = TEAM_ID, channel: str = CHANNEL) -> str:
    return urllib.parse.urlencode(
        {
            "token": "legacy",
            "team_id": team,
            "team_domain": "acme",
            "channel_id": channel,
            "channel_name": "general",
            "user_id": user,
            "user_name": user.lower(),
            "command": "/doppel",
            "text": text,
            "api_app_id": "A0DOPPEL",
            "response_url": "http://127.0.0.1:9/unused",
            "trigger_id": "1.2.3",
        }
    )


def action_form(action_id: str, value: str, *, user: str, team: str = TEAM_ID) -> str:
    payload = {
        "type": "block_actions",
        "team": {"id": team, "domain": "acme"},
        "user": {"id": user},
        "api_app_id": "A0DOPPEL",
        "channel": {"id": CHANNEL},
        "container": {"type": "message"},
        "trigger_id": "1.2.3",
        "response_url": "http://127.0.0.1:9/unused",
        "actions": [
            {
                "action_id": action_id,
                "block_id": "b1",
                "type": "button",
                "value": value,
                "action_ts": str(time.time()),
            }
        ],
    }
    return urllib.parse.urlencode({"payload": json.dumps(payload)})


def say(
    emulator: SlackEmulator,
    user: str,
    text: str,
    *,
    channel: str = CHANNEL,
    thread_ts: str | None = None,
    team: Team | None = None,
) -> str:
    """Store a person's message as Slack would before sending its event; returns its ts."""
    team = team or emulator.team
    with emulator._lock:
        emulator._seq += 1
        ts = f"{int(time.time())}.{emulator._seq:06d}"
        message = {"type": "message", "user": user, "text": text, "ts": ts}
        if thread_ts:
            message["thread_ts"] = thread_ts
        team.messages[channel].append(message)
    return ts


class OAuthSlackEmulator(SlackEmulator):
    """`SlackEmulator` with `oauth.v2.access`: `grant(team_id)` plays the user clicking Allow and returns
    the code Slack would put in the redirect; exchanging it (with the right client id and secret) issues a
    new bot token for that team, rotating (with a refresh token) when `rotating` is set. `grant(team_id,
    enterprise_id=E)` is an install in a workspace of Enterprise Grid org E, `org_wide=True` an install on
    the whole org (the answer names no team, as Slack's does)."""

    def __init__(self, *, client_id: str, client_secret: str, rotating: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client_id, self.client_secret, self.rotating = client_id, client_secret, rotating
        self.codes: dict[str, str] = {}
        self.grid: dict[str, tuple[str | None, bool]] = {}  # code -> (enterprise id, org-wide)
        self.refresh_tokens: dict[str, str] = {}
        self.issued: list[str] = []
        self.revoked: list[str] = []  # tokens given up with auth.revoke
        self._auth = threading.local()

    def grant(self, team_id: str, *, enterprise_id: str | None = None, org_wide: bool = False) -> str:
        code = f"code-{len(self.codes) + 1}-{team_id}"
        self.codes[code] = team_id
        self.grid[code] = (enterprise_id, org_wide)
        return code

    def _handle(self, request: Any) -> None:
        self._auth.header = request.headers.get("Authorization", "")
        super()._handle(request)

    def _dispatch(self, method: str, params: dict[str, Any], token: str | None) -> Any:
        if method == "auth.revoke" and token in self._by_token:
            with self._lock:
                del self._by_token[token]
                self.revoked.append(token)
            return 200, {"ok": True, "revoked": True}, {}
        if method != "oauth.v2.access":
            return super()._dispatch(method, params, token)
        try:
            return 200, {"ok": True, **self._access(params)}, {}
        except ApiError as exc:
            return 200, {"ok": False, "error": exc.error}, {}

    def _access(self, params: dict[str, Any]) -> dict[str, Any]:
        header = getattr(self._auth, "header", "")
        client = (params.get("client_id"), params.get("client_secret"))
        if header.startswith("Basic "):
            client = tuple(base64.b64decode(header[6:]).decode().split(":", 1))  # type: ignore[assignment]
        if client != (self.client_id, self.client_secret):
            raise ApiError("invalid_client_id" if client[0] != self.client_id else "bad_client_secret")
        with self._lock:
            enterprise_id, org_wide = self.grid.get(str(params.get("code")), (None, False))
            if params.get("grant_type") == "refresh_token":
                team_id = self.refresh_tokens.pop(str(params.get("refresh_token")), None)
            else:
                team_id = self.codes.pop(str(params.get("code")), None)
            if team_id is None:
                raise ApiError("invalid_grant" if params.get("grant_type") else "invalid_code")
            team = self.teams[team_id]
            token = f"xoxb-{team_id}-oauth-{len(self.issued) + 1}"
            if self.rotating:
                token = f"xoxe.{token}"
            self.issued.append(token)
            self._by_token[token] = team
            result: dict[str, Any] = {
                "access_token": token,
                "token_type": "bot",
                "scope": "app_mentions:read,chat:write,commands",
                "bot_user_id": team.bot_user_id,
                "app_id": "A0DOPPEL",
                "team": None if org_wide else {"id": team.id, "name": team.name},
                "enterprise": {"id": enterprise_id, "name": "Grid"} if enterprise_id else None,
                "is_enterprise_install": org_wide,
                "authed_user": {"id": "U01ALICE"},
            }
            if self.rotating:
                refresh = f"xoxe-1-refresh-{len(self.issued)}"
                self.refresh_tokens[refresh] = team_id
                result.update(refresh_token=refresh, expires_in=60)
            return result


@pytest_asyncio.fixture
async def bot_kube(kmock: Any) -> tuple[Any, str]:
    """kmock serving the resources the bot uses; the URL is what a kubeconfig's `server` would say."""
    verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
    kmock.resources["doppel.dev/v1alpha1/doppelusers"] = kmock_lib.ResourceInfo(
        kind="DoppelUser", namespaced=True, verbs=verbs, subresources=["status"]
    )
    for plural, kind in (("configmaps", "ConfigMap"), ("secrets", "Secret")):
        kmock.resources[f"v1/{plural}"] = kmock_lib.ResourceInfo(kind=kind, namespaced=True, verbs=verbs)
    kmock.resources["v1/namespaces"] = kmock_lib.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)
    configmaps = kmock_lib.resource("", "v1", "configmaps")

    def list_by_label(request: Any) -> dict[str, Any]:
        """LIST ConfigMaps honouring `labelSelector` (`key=value,...`) as the API server does; kmock alone
        would answer every object."""
        wanted = dict(
            term.split("=", 1) for term in (request.params.get("labelSelector") or "").split(",") if term
        )
        items = []
        for (resource, namespace, _), obj in list(kmock.objects.items()):
            if resource != configmaps or obj.deleted or request.namespace not in (None, namespace):
                continue
            labels = (obj.raw.get("metadata") or {}).get("labels") or {}
            if all(labels.get(key) == value for key, value in wanted.items()):
                items.append(obj.raw)
        return {"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {}, "items": items}

    kmock[kmock_lib.action.LIST, configmaps] << list_by_label
    return kmock, str(kmock.url).rstrip("/")


def name_of(handle: str, team: str = TEAM_ID, user_id: str | None = None) -> str:
    """The DoppelUser name `/doppel train @handle` gives in workspace `team` (person `user_id`: a handle
    that is no name as it is gets a hash of it)."""
    return object_name(handle, team, user_id)


def doppel_body(
    name: str,
    user_id: str,
    *,
    phase: str = "Ready",
    served_name: str | None = None,
    team: str = TEAM_ID,
    namespace: str | None = None,
    **status: Any,
) -> dict[str, Any]:
    """A DoppelUser as the operator leaves it: spec as `/doppel train` writes it (for handle `name`, of
    workspace `team`), status of `phase`."""
    body: dict[str, Any] = {
        "apiVersion": "doppel.dev/v1alpha1",
        "kind": "DoppelUser",
        "metadata": {
            "name": name_of(name, team),
            "namespace": namespace or (NAMESPACE if team == TEAM_ID else f"doppel-{team.lower()}"),
            "labels": {LABEL_TEAM: team},
        },
        "spec": {
            "slack": {"teamId": team, "tokenSecretRef": {"name": token_secret("slack-bot-token", team)}},
            "target": {"userId": user_id, "handle": name},
            "baseModel": {"servedName": "doppel-tiny", "path": "/models/tiny"},
        },
        "status": {"phase": phase, **status},
    }
    if served_name:
        body["status"]["adapter"] = {"servedName": served_name, "path": "/adapters/x", "version": 1}
    return body


def as_team(workspace: dict[str, Any], team_id: str, name: str) -> dict[str, Any]:
    """`workspace` (export shape) as another team's: its people are members of `team_id`."""
    copied = copy.deepcopy(workspace)
    copied["team"] = {"id": team_id, "name": name, "domain": name.lower()}
    for user in copied["users"]:
        user["team_id"] = team_id
    return copied


def bot_config(**changes: Any) -> BotConfig:
    config = BotConfig(
        signing_secret=SIGNING_SECRET,
        bot_token=ACME_TOKEN,
        bot_namespace=BOT_NAMESPACE,
        vllm_url="http://127.0.0.1:9",
        vllm_timeout_s=120.0,
        max_tokens=24,
        poll_interval_s=0.2,
        install_allowlist=frozenset({"any"}),  # OAuth tests install freely; test_bot_security narrows it
    )
    return replace(config, **changes)


class BotHarness:
    """The real bot served by uvicorn on loopback, talking to the Slack emulator and kmock."""

    def __init__(self, bot: Bot, emulator: SlackEmulator) -> None:
        self.bot, self.emulator = bot, emulator
        # The socket is bound here and handed to uvicorn: a port picked free and bound later can be taken in
        # between by another test process (uvicorn then exits, and pytest with it).
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.AsyncClient(base_url=self.url, timeout=30.0)
        # The bot's own server configuration (its protocol with header deadlines included).
        self._server = uvicorn.Server(
            bot.server_config("127.0.0.1", self.port, log_level="warning", lifespan="on")
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> BotHarness:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                try:
                    self._task.result()
                except SystemExit as exit_:
                    raise RuntimeError(f"the bot's server did not start (exit {exit_.code})") from None
            await asyncio.sleep(0.02)
        return self

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self.http.aclose()

    async def event(self, payload: dict[str, Any], **sign_kwargs: Any) -> httpx.Response:
        body = json.dumps(payload)
        headers = {"Content-Type": "application/json", **sign(body, **sign_kwargs)}
        return await self.http.post("/slack/events", content=body, headers=headers)

    async def form(self, body: str, **sign_kwargs: Any) -> httpx.Response:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(body, **sign_kwargs)}
        return await self.http.post("/slack/events", content=body, headers=headers)

    async def wait_posts(
        self, channel: str, count: int, *, timeout: float = 60.0, team: Team | None = None
    ) -> list[dict[str, Any]]:
        """The bot's messages in `channel` once there are at least `count` (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            posts = self.emulator.posted(channel, team)
            if len(posts) >= count or time.monotonic() > deadline:
                assert len(posts) >= count, f"expected {count} posts in {channel}, got {posts}"
                return posts
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def bot_harness(
    bot_kube: tuple[Any, str], slack_emulator: SlackEmulator
) -> AsyncIterator[Callable[..., Any]]:
    """`await start(config=None, **create_bot_kwargs)` -> a started `BotHarness` (stopped after the test)."""
    _, url = bot_kube
    started: list[BotHarness] = []

    async def start(
        config: BotConfig | None = None, emulator: SlackEmulator | None = None, **kwargs: Any
    ) -> BotHarness:
        emulator = emulator or slack_emulator
        config = config or bot_config()
        config = replace(config, slack_api_url=emulator.base_url)
        harness = await BotHarness(create_bot(config, kube_server=url, **kwargs), emulator).start()
        started.append(harness)
        return harness

    yield start
    for harness in started:
        await harness.stop()


def kube_for(url: str) -> Kube:
    return Kube(api_client(url))


class TcpGate:
    """Forwards 127.0.0.1:`port` to `target_port` while open; closed, connections are refused."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


class SocketModeSlack:
    """Slack's side of Socket Mode on loopback: `apps.connections.open` (added to a `SlackEmulator`)
    hands out a ws:// URL served here; `send(type, payload)` delivers an envelope to the connected app and
    returns the app's acknowledgement."""

    def __init__(self, emulator: SlackEmulator, app_token: str) -> None:
        self.emulator, self.app_token = emulator, app_token
        self.port = free_port()
        self.socket: Any = None
        self.connected = asyncio.Event()
        self.acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._runner: Any = None
        dispatch = emulator._dispatch

        def dispatch_with_socket_mode(method: str, params: dict[str, Any], token: str | None) -> Any:
            if method != "apps.connections.open":
                return dispatch(method, params, token)
            if token != self.app_token:
                return 200, {"ok": False, "error": "invalid_auth"}, {}
            return 200, {"ok": True, "url": f"ws://127.0.0.1:{self.port}/link"}, {}

        emulator._dispatch = dispatch_with_socket_mode  # type: ignore[method-assign]

    async def start(self) -> None:
        from aiohttp import WSMsgType, web

        async def link(request: web.Request) -> web.WebSocketResponse:
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            await socket.send_json(
                {"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0"}}
            )
            self.socket = socket
            self.connected.set()
            async for message in socket:
                if message.type == WSMsgType.TEXT:
                    data = json.loads(message.data)
                    future = self.acks.get(data.get("envelope_id", ""))
                    if future is not None and not future.done():
                        future.set_result(data)
            return socket

        app = web.Application()
        app.router.add_get("/link", link)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def send(self, kind: str, payload: dict[str, Any], envelope_id: str) -> dict[str, Any]:
        await asyncio.wait_for(self.connected.wait(), 30)
        self.acks[envelope_id] = asyncio.get_running_loop().create_future()
        envelope = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind != "events_api",
            "retry_attempt": 0,
        }
        await self.socket.send_json(envelope)
        return await asyncio.wait_for(self.acks[envelope_id], 10)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
