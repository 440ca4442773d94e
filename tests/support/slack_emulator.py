"""A stateful Slack Web API emulator on loopback, for the real slack_sdk clients.

It serves one or more workspaces ("teams"), each loaded from the Slack *export* shape:

    {"team": {"id": "T1", "name": "Acme", "domain": "acme"},
     "users": [...users.json entries...],
     "channels": [...channels.json entries, plus is_private / is_archived / is_ext_shared / members...],
     "messages": {"<channel name>": [...messages, any order...]}}

Each team has its own bot token (tokens map to teams) and bot user. The emulator answers like Slack does:
HTTP 200 with `{"ok": false, "error": ...}` for API errors, cursor pagination (`limit`,
`response_metadata.next_cursor`, `has_more`), per-method rate limits by tier with HTTP 429 and an integer
`Retry-After`, and it records every call in `calls`. Requests may carry their arguments in the query string,
a form-encoded body or a JSON body, and the token as `Authorization: Bearer` or a `token` argument, which is
how slack_sdk's sync and async clients send them.

Direct messages: `conversations.open(users=U…)` opens (or finds) the bot's IM channel with that person
(`D…`), which `chat.postMessage` then posts to; `dm_channel(user_id)` names it for the tests. A channel id
the team does not have (a DM between people, as `/doppel` typed in one reports it) is `channel_not_found`.
chat.postMessage is limited per channel, as Slack's special limit is (`POST_PER_MINUTE_PER_CHANNEL`).

Rate profiles, as Slack documents them (`rate_profile`): "internal" and "marketplace" apps get each method's
tier; "non-marketplace" (a distributed app outside the Slack Marketplace, since May 2025) gets 1 request per
minute on conversations.history and conversations.replies, with no burst and `limit` capped at 15. Time is
compressible: `rate_scale` multiplies every limit and `Retry-After` is stated in Slack's (uncompressed)
seconds, so a client that divides it by the same scale waits exactly as it would against Slack.

Like Slack, deleting a thread root that has replies leaves a `tombstone` root (user USLACKBOT, hidden, with
`reply_count` and `latest_reply`) whose replies stay readable. Errors Slack gives: `missing_scope` with
`needed`/`provided` (`set_scopes`), `token_revoked` (`revoke_token`), `account_inactive` (`deactivate`),
`invalid_limit`, `invalid_ts_oldest`/`invalid_ts_latest`, `is_archived` on join, `not_in_channel`
(`remove_member`), `channel_not_found`, `channel_is_limited_access` (a channel with `is_limited_access`),
`invalid_cursor`.

Slack Connect: `add_external_user(user, channel_id)` puts a user of another organisation in a shared
channel: `users.info` knows them (with their own `team_id`), `users.list` does not list them.
`chat.postEphemeral` messages are kept apart (`ephemeral(channel)`): only their user sees them, so they
are not in the channel's history.

Fault injection for the bad-input tests: `fail(method, count, status)` answers the next `count` calls of a
method with an HTTP error (429 with `Retry-After: 1` and Slack's `ratelimited` body, as Slack answers);
`fail_with(method, error, count)` with an `ok: false` error;
`vanish_channel(channel_id, after_calls)` deletes a channel after it has been used `after_calls` times.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# Documented per-minute limits of each tier; chat.postMessage is "special" (about 1/s per channel), modelled
# here as Tier 4 per method.
TIER_PER_MINUTE = {1: 1, 2: 20, 3: 50, 4: 100}
METHOD_TIER = {
    "auth.test": 4,
    "users.list": 2,
    "users.info": 4,
    "conversations.list": 2,
    "conversations.info": 3,
    "conversations.join": 3,
    "conversations.history": 3,
    "conversations.replies": 3,
    "conversations.open": 3,
    "chat.postMessage": 4,
    "chat.postEphemeral": 4,
    "views.open": 4,
}
# chat.postMessage's own limit: about one message a second per channel, short bursts allowed.
POST_PER_MINUTE_PER_CHANNEL = 60
MAX_LIMIT = {"users.list": 1000, "conversations.list": 1000, "conversations.history": 999}
# (per minute, burst in calls) of the methods a profile changes.
NON_MARKETPLACE_METHODS = ("conversations.history", "conversations.replies")
RATE_PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "internal": {},
    "marketplace": {},
    "non-marketplace": dict.fromkeys(NON_MARKETPLACE_METHODS, (1.0, 1.0)),
}
NON_MARKETPLACE_PAGE = 15
# The scopes a bot token needs for each method (public channels / private ones).
METHOD_SCOPES = {
    "users.list": ("users:read", "users:read"),
    "users.info": ("users:read", "users:read"),
    "conversations.list": ("channels:read", "groups:read"),
    "conversations.info": ("channels:read", "groups:read"),
    "conversations.join": ("channels:join", "channels:join"),
    "conversations.history": ("channels:history", "groups:history"),
    "conversations.replies": ("channels:history", "groups:history"),
    "chat.postMessage": ("chat:write", "chat:write"),
}
TOMBSTONE_TEXT = "This message was deleted."


class ApiError(Exception):
    """An `ok: false` answer, with any extra fields Slack adds (`needed`, `provided`)."""

    def __init__(self, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.extra = extra


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    time: float
    status: int
    error: str | None
    team: str | None


@dataclass
class Team:
    id: str
    name: str
    domain: str
    token: str
    bot_user_id: str
    bot_id: str
    users: list[dict[str, Any]]
    channels: dict[str, dict[str, Any]]
    messages: dict[str, list[dict[str, Any]]]  # channel id -> messages sorted by ts
    scopes: set[str] | None = None  # None: every scope
    token_error: str | None = None  # token_revoked, account_inactive
    external_users: list[dict[str, Any]] = field(default_factory=list)  # Slack Connect: other orgs' people
    ephemeral: list[dict[str, Any]] = field(default_factory=list)  # chat.postEphemeral, seen by one user
    views: list[dict[str, Any]] = field(
        default_factory=list
    )  # views.open: the modals opened, with their user
    triggers: dict[str, tuple[str, float]] = field(default_factory=dict)  # trigger_id -> (user, issued at)

    def channel_by_ref(self, ref: str) -> dict[str, Any]:
        if ref in self.channels:
            return self.channels[ref]
        name = ref.lstrip("#")
        for channel in self.channels.values():
            if channel["name"] == name:
                return channel
        raise ApiError("channel_not_found")

    def is_member(self, channel: dict[str, Any]) -> bool:
        return self.bot_user_id in channel.get("members", [])


@dataclass
class _Bucket:
    """Token bucket: `rate` calls a second on average, bursts of up to `capacity`."""

    rate: float  # tokens per second
    capacity: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self, now: float) -> float:
        """Take a token; return 0, or the seconds to wait when none is left."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = max(now, self.updated)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class SlackEmulator:
    """The emulator; `start()` serves it on 127.0.0.1, `base_url` is what slack_sdk takes.

    `rate_scale` multiplies every tier's limit (tests run fast), `burst_seconds` is how many seconds' worth
    of calls a method takes at once before 429s start, `latency` delays every answer, `rate_profile` is the
    kind of app Slack takes the client for (see the module's docstring), `post_limit` sets
    chat.postMessage's per-channel limit apart (messages a second, burst).
    """

    def __init__(
        self,
        *,
        rate_scale: float = 1.0,
        latency: float = 0.0,
        burst_seconds: float = 6.0,
        rate_profile: str = "internal",
        post_limit: tuple[float, float] | None = None,
    ) -> None:
        if rate_profile not in RATE_PROFILES:
            raise ValueError(f"unknown rate profile {rate_profile!r}")
        self.rate_scale = rate_scale
        self.rate_profile = rate_profile
        # chat.postMessage per channel: (messages a second, burst); None scales Slack's own like the tiers.
        self.post_limit = post_limit
        self.latency = latency  # seconds each answer takes, as a real round trip would
        self.burst_seconds = burst_seconds
        self.teams: dict[str, Team] = {}
        self.calls: list[Call] = []
        self._by_token: dict[str, Team] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._failures: dict[str, list[int]] = {}
        self._errors: dict[str, list[str]] = {}
        self._vanish: dict[str, int] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- setup -------------------------------------------------------------------------------------

    def add_team(
        self,
        workspace: dict[str, Any],
        *,
        token: str | None = None,
        bot_user_id: str | None = None,
        bot_name: str = "doppel",
    ) -> Team:
        ws = copy.deepcopy(workspace)
        info = ws.get("team", {})
        team_id = info.get("id", f"T{len(self.teams) + 1:08d}")
        bot_user_id = bot_user_id or f"UB{team_id[1:]}"
        team = Team(
            id=team_id,
            name=info.get("name", team_id),
            domain=info.get("domain", team_id.lower()),
            token=token or f"xoxb-{team_id}-emulator",
            bot_user_id=bot_user_id,
            bot_id=f"B{bot_user_id[1:]}",
            users=list(ws.get("users", [])),
            channels={c["id"]: c for c in ws.get("channels", [])},
            messages={},
        )
        if not any(u["id"] == bot_user_id for u in team.users):
            team.users.append(
                {
                    "id": bot_user_id,
                    "team_id": team_id,
                    "name": bot_name,
                    "real_name": bot_name,
                    "is_bot": True,
                    "deleted": False,
                    "profile": {"display_name": bot_name, "real_name": bot_name, "bot_id": team.bot_id},
                }
            )
        for channel in team.channels.values():
            channel.setdefault("members", [])
            msgs = ws.get("messages", {}).get(channel["name"], [])
            team.messages[channel["id"]] = sorted(msgs, key=lambda m: _ts_key(m["ts"]))
        self.teams[team_id] = team
        self._by_token[team.token] = team
        return team

    @property
    def team(self) -> Team:
        """The first team, for single-workspace tests."""
        return next(iter(self.teams.values()))

    def fail(self, method: str, count: int, status: int = 503) -> None:
        """Answer the next `count` calls of `method` with HTTP `status`."""
        with self._lock:
            self._failures.setdefault(method, []).extend([status] * count)

    def fail_with(self, method: str, error: str, count: int = 1) -> None:
        """Answer the next `count` calls of `method` with `{"ok": false, "error": error}`."""
        with self._lock:
            self._errors.setdefault(method, []).extend([error] * count)

    def set_scopes(self, scopes: set[str] | None, team: Team | None = None) -> None:
        """The scopes the bot token was granted (None: all)."""
        with self._lock:
            (team or self.team).scopes = None if scopes is None else set(scopes)

    def revoke_token(self, team: Team | None = None) -> None:
        with self._lock:
            (team or self.team).token_error = "token_revoked"

    def deactivate(self, team: Team | None = None) -> None:
        """The bot user was deactivated: its token answers account_inactive."""
        with self._lock:
            (team or self.team).token_error = "account_inactive"

    def remove_member(self, channel_id: str, user_id: str | None = None, team: Team | None = None) -> None:
        """Someone removed `user_id` (default: the bot) from the channel."""
        team = team or self.team
        with self._lock:
            members = team.channels[channel_id]["members"]
            who = user_id or team.bot_user_id
            if who in members:
                members.remove(who)

    def vanish_channel(self, channel_id: str, after_calls: int = 0) -> None:
        """Delete `channel_id` once `after_calls` more calls have named it."""
        with self._lock:
            self._vanish[channel_id] = after_calls

    def add_member(self, channel_id: str, user_id: str, team: Team | None = None) -> None:
        with self._lock:
            members = (team or self.team).channels[channel_id]["members"]
            if user_id not in members:
                members.append(user_id)

    def add_message(self, channel_id: str, message: dict[str, Any], team: Team | None = None) -> None:
        """A message someone wrote (not the bot), as if it had just been posted."""
        with self._lock:
            msgs = (team or self.team).messages[channel_id]
            msgs.append(dict(message))
            msgs.sort(key=lambda m: _ts_key(m["ts"]))

    def delete_message(self, channel_id: str, ts: str, team: Team | None = None) -> None:
        """Someone deleted a message. A thread root with replies becomes a tombstone, as in Slack: the
        replies stay readable under it."""
        with self._lock:
            msgs = (team or self.team).messages[channel_id]
            if not any(m.get("thread_ts") == ts and m["ts"] != ts for m in msgs):
                msgs[:] = [m for m in msgs if m["ts"] != ts]
                return
            for i, message in enumerate(msgs):
                if message["ts"] == ts:
                    msgs[i] = {
                        "type": "message",
                        "subtype": "tombstone",
                        "user": "USLACKBOT",
                        "text": TOMBSTONE_TEXT,
                        "hidden": True,
                        "ts": ts,
                        "thread_ts": ts,
                    }

    def add_external_user(self, user: dict[str, Any], channel_id: str, team: Team | None = None) -> None:
        """A user of another organisation (their own `team_id`) in a Slack Connect channel of `team`."""
        team = team or self.team
        with self._lock:
            team.external_users.append(copy.deepcopy(user))
        self.add_member(channel_id, user["id"], team)

    def ephemeral_posts(self, channel_id: str, team: Team | None = None) -> list[dict[str, Any]]:
        """The bot's ephemeral messages in a channel (each with the `user` who alone sees it)."""
        team = team or self.team
        with self._lock:
            return [dict(m) for m in team.ephemeral if m["channel"] == channel_id]

    def opened_views(self, team: Team | None = None) -> list[dict[str, Any]]:
        """The modals the bot opened (views.open), each with the `user` whose trigger it used."""
        team = team or self.team
        with self._lock:
            return [dict(v) for v in team.views]

    def posted(self, channel_id: str, team: Team | None = None) -> list[dict[str, Any]]:
        """Messages the bot posted to a channel, oldest first."""
        team = team or self.team
        with self._lock:
            return [dict(m) for m in team.messages.get(channel_id, []) if m.get("bot_id") == team.bot_id]

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 10.0) -> None:
        """Wait until no call has come for `quiet_s`: a client that gave up (a scrape that stopped at its
        first error) may have requests in flight, which would take an error injected for the next run."""
        deadline = time.monotonic() + timeout_s
        seen = -1
        while time.monotonic() < deadline:
            with self._lock:
                count = len(self.calls)
            if count == seen:
                return
            seen = count
            time.sleep(quiet_s)

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    # --- server ------------------------------------------------------------------------------------

    def start(self) -> SlackEmulator:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes; without this, Nagle's algorithm meets the
                # client's delayed ACK and every answer takes 40 ms longer.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                emulator._handle(self)

            def do_POST(self) -> None:
                emulator._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="slack-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the emulator first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/"

    def __enter__(self) -> SlackEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        method = url.path.rsplit("/", 1)[-1]
        params: dict[str, Any] = dict(parse_qsl(url.query))
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        ctype = request.headers.get("Content-Type", "")
        if body and ctype.startswith("application/json"):
            params.update(json.loads(body))
        elif body:
            params.update(parse_qsl(body.decode()))
        token = params.pop("token", None)
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer ") :]
        if self.latency:
            time.sleep(self.latency)
        status, payload, headers = self._dispatch(method, params, token)
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        request.send_response(status)
        is_json = isinstance(payload, dict)
        request.send_header("Content-Type", "application/json; charset=utf-8" if is_json else "text/html")
        request.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(data)

    def _dispatch(
        self, method: str, params: dict[str, Any], token: str | None
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        with self._lock:
            now = time.monotonic()
            team = self._by_token.get(token or "")
            record = Call(method, dict(params), time.time(), 200, None, team.id if team else None)
            self.calls.append(record)
            failures = self._failures.get(method)
            if failures:
                record.status = failures.pop(0)
                if record.status == 429:
                    record.error = "ratelimited"
                    return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"}
                return record.status, b"<html>upstream error</html>", {}
            handler = getattr(self, "_m_" + method.replace(".", "_"), None)
            if handler is None:
                record.error = "unknown_method"
                return 200, {"ok": False, "error": "unknown_method"}, {}
            if team is None or team.token_error:
                error = team.token_error if team else "not_authed" if not token else "invalid_auth"
                record.error = error
                return 200, {"ok": False, "error": error}, {}
            wait = self._bucket(team.id, method).take(now)
            # In Slack's seconds: a client that compresses time by the same scale divides it back.
            scale = self.rate_scale
            if method == "chat.postMessage" and not wait:
                wait = self._channel_bucket(team.id, str(params.get("channel", ""))).take(now)
                if self.post_limit:
                    scale = (
                        1.0  # an explicit limit is in real seconds (the bot's slack_sdk client waits them)
                    )
            if wait > 0:
                record.status, record.error = 429, "ratelimited"
                headers = {"Retry-After": str(max(1, math.ceil(wait * scale)))}
                return 429, {"ok": False, "error": "ratelimited"}, headers
            try:
                injected = self._errors.get(method)
                if injected:
                    raise ApiError(injected.pop(0))
                self._check_scope(team, method, params)
                self._maybe_vanish(team, params.get("channel"))
                result = handler(team, params)
            except ApiError as exc:
                record.error = exc.error
                return 200, {"ok": False, "error": exc.error, **exc.extra}, {}
            return 200, {"ok": True, **result}, {}

    def _bucket(self, team_id: str, method: str) -> _Bucket:
        key = (team_id, method)
        if key not in self._buckets:
            limited = RATE_PROFILES[self.rate_profile].get(method)
            per_minute = limited[0] if limited else TIER_PER_MINUTE[METHOD_TIER[method]]
            rate = per_minute * self.rate_scale / 60
            capacity = limited[1] if limited else max(1.0, rate * self.burst_seconds)
            self._buckets[key] = _Bucket(rate=rate, capacity=capacity, tokens=capacity)
        return self._buckets[key]

    def _channel_bucket(self, team_id: str, channel: str) -> _Bucket:
        key = (team_id, f"chat.postMessage/{channel}")
        if key not in self._buckets:
            rate = POST_PER_MINUTE_PER_CHANNEL * self.rate_scale / 60
            rate, capacity = self.post_limit or (rate, max(1.0, rate * self.burst_seconds))
            self._buckets[key] = _Bucket(rate=rate, capacity=capacity, tokens=capacity)
        return self._buckets[key]

    def dm_channel(self, user_id: str, team: Team | None = None) -> str | None:
        """The id of the bot's direct-message channel with `user_id`, once opened."""
        team = team or self.team
        with self._lock:
            return next(
                (c["id"] for c in team.channels.values() if c.get("is_im") and c.get("user") == user_id), None
            )

    def allowed_per_minute(self, method: str) -> float:
        """Slack's allowance for `method` under this profile, in calls per (compressed) minute."""
        limited = RATE_PROFILES[self.rate_profile].get(method)
        return (limited[0] if limited else TIER_PER_MINUTE[METHOD_TIER[method]]) * self.rate_scale

    def page_cap(self, method: str) -> int:
        """The most items one call of `method` returns under this profile."""
        if self.rate_profile == "non-marketplace" and method in NON_MARKETPLACE_METHODS:
            return NON_MARKETPLACE_PAGE
        return MAX_LIMIT.get(method, 1000)

    def _check_scope(self, team: Team, method: str, params: dict[str, Any]) -> None:
        if team.scopes is None or method not in METHOD_SCOPES:
            return
        public, private = METHOD_SCOPES[method]
        channel = team.channels.get(str(params.get("channel", "")))
        if method == "conversations.list":
            types = str(params.get("types") or "public_channel").split(",")
            needed = [s for t, s in (("public_channel", public), ("private_channel", private)) if t in types]
        else:
            needed = [private if channel is not None and channel.get("is_private") else public]
        missing = [s for s in needed if s not in team.scopes]
        if missing:
            raise ApiError("missing_scope", needed=",".join(missing), provided=",".join(sorted(team.scopes)))

    def _maybe_vanish(self, team: Team, channel_id: str | None) -> None:
        if channel_id not in self._vanish:
            return
        if self._vanish[channel_id] <= 0:
            team.channels.pop(channel_id, None)
            team.messages.pop(channel_id, None)
            del self._vanish[channel_id]
        else:
            self._vanish[channel_id] -= 1

    # --- methods -----------------------------------------------------------------------------------

    def _m_auth_test(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": f"https://{team.domain}.slack.com/",
            "team": team.name,
            "user": "doppel",
            "team_id": team.id,
            "user_id": team.bot_user_id,
            "bot_id": team.bot_id,
            "is_enterprise_install": False,
        }

    def _m_users_list(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        page, cursor = _paginate(team.users, params, MAX_LIMIT["users.list"], default_limit=0)
        return {"members": page, "cache_ts": int(time.time()), "response_metadata": {"next_cursor": cursor}}

    def _m_users_info(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        for user in [*team.users, *team.external_users]:
            if user["id"] == params.get("user"):
                return {"user": user}
        raise ApiError("user_not_found")

    def _m_conversations_list(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        types = str(params.get("types") or "public_channel").split(",")
        exclude_archived = _flag(params.get("exclude_archived"))
        listed = []
        for channel in team.channels.values():
            private = channel.get("is_private", False)
            kind = "im" if channel.get("is_im") else "private_channel" if private else "public_channel"
            if kind not in types:
                continue
            if private and not team.is_member(channel):
                continue  # a bot sees only the private channels it was invited to
            if exclude_archived and channel.get("is_archived"):
                continue
            listed.append(self._channel_view(team, channel))
        page, cursor = _paginate(listed, params, MAX_LIMIT["conversations.list"], default_limit=100)
        return {"channels": page, "response_metadata": {"next_cursor": cursor}}

    def _m_conversations_info(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._visible_channel(team, params)
        return {"channel": self._channel_view(team, channel)}

    def _m_conversations_join(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._visible_channel(team, params)
        if channel.get("is_private"):
            raise ApiError("method_not_supported_for_channel_type")
        if channel.get("is_archived"):
            raise ApiError("is_archived")
        result: dict[str, Any] = {}
        if team.is_member(channel):
            result["warning"] = "already_in_channel"
            result["response_metadata"] = {"warnings": ["already_in_channel"]}
        else:
            channel["members"].append(team.bot_user_id)
        return {"channel": self._channel_view(team, channel), **result}

    def _m_conversations_history(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._readable_channel(team, params)
        msgs = [
            m
            for m in team.messages[channel["id"]]
            if m.get("thread_ts") in (None, m["ts"]) or m.get("subtype") == "thread_broadcast"
        ]
        msgs = _between(msgs, params)
        msgs.reverse()  # newest first, as Slack does
        page, cursor = _paginate(msgs, params, self.page_cap("conversations.history"), default_limit=100)
        return {
            # Only the page is viewed: a view counts its replies over the whole channel.
            "messages": [self._message_view(team, channel["id"], m) for m in page],
            "has_more": bool(cursor),
            "pin_count": 0,
            "response_metadata": {"next_cursor": cursor},
        }

    def _m_conversations_replies(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._readable_channel(team, params)
        ts = params.get("ts")
        if not ts:
            raise ApiError("invalid_arguments")
        msgs = team.messages[channel["id"]]
        target = next((m for m in msgs if m["ts"] == ts), None)
        if target is None:
            raise ApiError("thread_not_found")
        root = target.get("thread_ts") or target["ts"]
        thread = [m for m in msgs if m["ts"] == root]
        thread += _between([m for m in msgs if m.get("thread_ts") == root and m["ts"] != root], params)
        page, cursor = _paginate(thread, params, self.page_cap("conversations.replies"), default_limit=1000)
        messages = [self._message_view(team, channel["id"], m) for m in page]
        return {"messages": messages, "has_more": bool(cursor), "response_metadata": {"next_cursor": cursor}}

    def _m_conversations_open(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        users = [u for u in str(params.get("users") or "").split(",") if u]
        if len(users) != 1:
            raise ApiError("not_enough_users" if not users else "too_many_users")
        user = next((u for u in team.users if u["id"] == users[0]), None)
        if user is None or user.get("deleted"):
            raise ApiError("user_not_found" if user is None else "user_disabled")
        if user.get("is_bot"):
            raise ApiError("cannot_dm_bot")
        for channel in team.channels.values():
            if channel.get("is_im") and channel.get("user") == users[0]:
                return {"channel": {"id": channel["id"]}, "already_open": True}
        channel_id = f"D{len(team.channels) + 1:04d}{users[0][1:]}"[:11]
        team.channels[channel_id] = {
            "id": channel_id,
            "name": channel_id,
            "is_im": True,
            "is_private": True,
            "user": users[0],
            "members": [team.bot_user_id, users[0]],
        }
        team.messages[channel_id] = []
        return {"channel": {"id": channel_id}}

    def _m_chat_postMessage(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = team.channel_by_ref(str(params.get("channel", "")))
        # Like a bot with chat:write.public: public channels without joining, private ones only as member.
        if channel.get("is_private") and not team.is_member(channel):
            raise ApiError("channel_not_found")
        if channel.get("is_archived"):
            raise ApiError("is_archived")
        if not params.get("text") and not params.get("blocks"):
            raise ApiError("no_text")
        self._seq += 1
        message: dict[str, Any] = {
            "type": "message",
            "ts": f"{int(time.time())}.{self._seq:06d}",
            "user": team.bot_user_id,
            "bot_id": team.bot_id,
            "text": params.get("text", ""),
        }
        for key in ("thread_ts", "username", "icon_emoji", "icon_url", "blocks"):
            if params.get(key):
                value = params[key]
                message[key] = json.loads(value) if key == "blocks" and isinstance(value, str) else value
        if "username" in message:
            message["subtype"] = "bot_message"
        msgs = team.messages[channel["id"]]
        msgs.append(message)
        msgs.sort(key=lambda m: _ts_key(m["ts"]))
        return {"channel": channel["id"], "ts": message["ts"], "message": message}

    def _m_chat_postEphemeral(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = team.channel_by_ref(str(params.get("channel", "")))
        if channel.get("is_private") and not team.is_member(channel):
            raise ApiError("channel_not_found")
        if not params.get("text") and not params.get("blocks"):
            raise ApiError("no_text")
        known = {u["id"] for u in [*team.users, *team.external_users]}
        if params.get("user") not in known:
            raise ApiError("user_not_found")
        if params["user"] not in channel["members"]:
            raise ApiError("user_not_in_channel")
        self._seq += 1
        ts = f"{int(time.time())}.{self._seq:06d}"
        message = {"channel": channel["id"], "user": params["user"], "text": params.get("text", ""), "ts": ts}
        if params.get("thread_ts"):
            message["thread_ts"] = params["thread_ts"]
        team.ephemeral.append(message)
        return {"message_ts": ts}

    def issue_trigger(self, user_id: str, team: Team | None = None) -> str:
        """A trigger_id as Slack puts in an interaction's payload: good for one views.open, for 3 s."""
        team = team or self.team
        with self._lock:
            self._seq += 1
            trigger = f"{self._seq}.{int(time.time())}.{self._seq * 7919 % 100000:05d}"
            team.triggers[trigger] = (user_id, time.time())
        return trigger

    def _m_views_open(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        issued = team.triggers.pop(str(params.get("trigger_id", "")), None)
        if issued is None:
            raise ApiError("invalid_trigger_id")
        if time.time() - issued[1] > 3.0:
            raise ApiError("expired_trigger_id")
        view = params.get("view")
        view = json.loads(view) if isinstance(view, str) else view
        if not isinstance(view, dict) or view.get("type") != "modal" or not view.get("blocks"):
            raise ApiError("invalid_arguments")
        if len(view.get("title", {}).get("text", "")) > 24 or len(view.get("private_metadata", "")) > 3000:
            raise ApiError("invalid_arguments")
        self._seq += 1
        opened = {**view, "id": f"V{self._seq:08d}", "team_id": team.id, "state": {"values": {}}}
        team.views.append({**opened, "user": issued[0]})
        return {"view": opened}

    # --- views -------------------------------------------------------------------------------------

    def _visible_channel(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = team.channels.get(str(params.get("channel", "")))
        if channel is None or (channel.get("is_private") and not team.is_member(channel)):
            raise ApiError("channel_not_found")
        return channel

    def _readable_channel(self, team: Team, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._visible_channel(team, params)
        if channel.get("is_limited_access"):
            raise ApiError("channel_is_limited_access")
        if not team.is_member(channel):
            raise ApiError("not_in_channel")
        return channel

    def _channel_view(self, team: Team, channel: dict[str, Any]) -> dict[str, Any]:
        private = channel.get("is_private", False)
        return {
            "id": channel["id"],
            "name": channel["name"],
            "is_channel": not private and not channel.get("is_im"),
            "is_group": False,
            "is_im": channel.get("is_im", False),
            "is_private": private,
            "is_archived": channel.get("is_archived", False),
            "is_general": channel.get("is_general", False),
            "is_shared": channel.get("is_shared", channel.get("is_ext_shared", False)),
            "is_ext_shared": channel.get("is_ext_shared", False),
            "is_org_shared": channel.get("is_org_shared", False),
            "is_member": team.is_member(channel),
            "created": channel.get("created", 0),
            "creator": channel.get("creator", ""),
            "topic": channel.get("topic", {"value": "", "creator": "", "last_set": 0}),
            "purpose": channel.get("purpose", {"value": "", "creator": "", "last_set": 0}),
            "num_members": len(channel["members"]),
        }

    def _message_view(self, team: Team, channel_id: str, message: dict[str, Any]) -> dict[str, Any]:
        view = {k: v for k, v in message.items() if k not in ("replies", "reply_count", "reply_users")}
        view.setdefault("type", "message")
        replies = [m for m in team.messages[channel_id] if m.get("thread_ts") == message["ts"]]
        replies = [m for m in replies if m["ts"] != message["ts"]]
        if replies:
            view["thread_ts"] = message["ts"]
            view["reply_count"] = len(replies)
            view["reply_users"] = sorted({m.get("user", "") for m in replies})
            view["reply_users_count"] = len(view["reply_users"])
            view["latest_reply"] = replies[-1]["ts"]
        return view


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a burst of connections (a bot answering 200 mentions at
    # once) then has its SYNs dropped and retried after 1, 3, 7, 15... s, delays Slack never causes.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a request (a cancelled task) is normal, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _ts_key(ts: str) -> tuple[int, int]:
    seconds, _, micros = ts.partition(".")
    return int(seconds), int(micros or 0)


def _param_ts(params: dict[str, Any], key: str) -> tuple[int, int] | None:
    """A timestamp argument (`oldest`, `latest`); Slack answers invalid_ts_<key> for anything else."""
    value = str(params.get(key) or "")
    if not value:
        return None
    seconds, _, micros = value.partition(".")
    if not seconds.isdigit() or (micros and not micros.isdigit()):
        raise ApiError(f"invalid_ts_{key}")
    return int(seconds), int(micros.ljust(6, "0")[:6] or 0)


def _flag(value: Any) -> bool:
    return value in (True, 1, "1", "true", "True")


def _between(messages: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages within `oldest`/`latest` (exclusive unless `inclusive`), oldest first."""
    inclusive = _flag(params.get("inclusive"))
    oldest = _param_ts(params, "oldest")
    latest = _param_ts(params, "latest")
    kept = []
    for message in messages:
        key = _ts_key(message["ts"])
        if oldest is not None and (key < oldest or (key == oldest and not inclusive)):
            continue
        if latest is not None and (key > latest or (key == latest and not inclusive)):
            continue
        kept.append(message)
    return kept


def _paginate(
    items: list[dict[str, Any]], params: dict[str, Any], cap: int, *, default_limit: int
) -> tuple[list[dict[str, Any]], str]:
    """One page of `items` (at most `cap`: Slack silently caps `limit`) and the cursor of the next ("" at the
    end). Slack's cursors are opaque base64."""
    try:
        limit = int(params.get("limit") or default_limit)
    except ValueError:
        raise ApiError("invalid_limit") from None
    if limit < 0:
        raise ApiError("invalid_limit")
    limit = min(limit, cap) if limit else len(items)
    start = 0
    if params.get("cursor"):
        try:
            kind, _, offset = base64.b64decode(str(params["cursor"])).decode().partition(":")
            start = int(offset)
        except ValueError:
            raise ApiError("invalid_cursor") from None
        if kind != "next" or not 0 <= start <= len(items):
            raise ApiError("invalid_cursor")
    end = start + max(limit, 1)
    cursor = base64.b64encode(f"next:{end}".encode()).decode() if end < len(items) else ""
    return items[start:end], cursor
