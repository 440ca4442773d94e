"""The HTTP intake, plain ASGI: POST /slack/events checked before Bolt sees it (its Slack headers
well-formed and given once, its body bounded in size and in time, signed, well-formed; a bad request gets
a one-line 4xx answer, never a traceback), events acknowledged at once and handed on, and `Front`, which
routes to it and tells the worker when the server is busy acknowledging (a client that stalls does not
count: answers keep flowing).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EVENTS_PATH = "/slack/events"
# Slack's events, commands and interactions are a few kilobytes; anything this big is not from Slack.
MAX_BODY_BYTES = 1 << 20
# Slack's rule: a request older than 5 minutes is refused (replays).
MAX_REQUEST_AGE_S = 300
# The whole body must arrive within this: Slack sends a few kilobytes at once; a client that trickles or
# stalls it is holding a connection, not sending an event.
BODY_TIMEOUT_S = 10.0
# Slack's timestamp is Unix seconds in ASCII digits ("¹²³" are digits to str.isdigit, and int() of 5,000
# digits raises); its signature is `v0=` and 64 hex digits.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"v0=[0-9a-f]{64}")
_SINGLE_HEADERS = ("x-slack-request-timestamp", "x-slack-signature", "content-length", "content-type")


class BodyTooLarge(Exception):
    """The request's body is over the limit (from its Content-Length, or as it is read)."""


class Disconnected(Exception):
    """The client went away before its body was read."""


class BodyTimeout(Exception):
    """The body did not arrive within `BODY_TIMEOUT_S`."""


async def read_bounded(receive: Receive, declared: str, limit: int) -> bytes:
    """The body from ASGI `http.request` messages; BodyTooLarge as soon as it is known to exceed `limit`
    (from its declared Content-Length, before anything is read, or as it arrives: read no further)."""
    if not re.fullmatch(r"[0-9]{0,20}", declared):
        raise BodyTooLarge  # no number a body of ours could have
    if declared and int(declared) > limit:
        raise BodyTooLarge
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await _read(receive, limit)
    except TimeoutError:
        raise BodyTimeout from None


async def _read(receive: Receive, limit: int) -> bytes:
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
    if not _TIMESTAMP.fullmatch(timestamp) or not _SIGNATURE.fullmatch(signature):
        return False
    if abs(time.time() - int(timestamp)) > MAX_REQUEST_AGE_S:
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
        named = [name.decode("latin-1") for name, _ in scope["headers"]]
        if any(named.count(name) > 1 for name in _SINGLE_HEADERS):
            await answer(send, 400, "duplicated request header")
            return
        try:
            body = await read_bounded(receive, headers.get("content-length", ""), MAX_BODY_BYTES)
        except BodyTooLarge:
            await answer(send, 413, "request body too large")
            return
        except BodyTimeout:
            await answer(send, 408, "request body not received in time")
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

    def __init__(self, intake: ASGIApp, rest: ASGIApp, settle_s: float = 0.02, stall_s: float = 0.2) -> None:
        self.intake = intake
        self.rest = rest
        self.settle_s = settle_s
        self.stall_s = stall_s
        self.serving = 0
        self.last_start = 0.0
        self.last_done = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.rest(scope, receive, send)
            return
        self.serving += 1
        self.last_start = time.monotonic()
        try:
            app = self.intake if scope["path"] == EVENTS_PATH else self.rest
            await app(scope, receive, send)
        finally:
            self.serving -= 1
            self.last_done = time.monotonic()

    def busy(self) -> bool:
        """Read from the worker's thread: an int and floats, each read atomically. Requests in flight count
        only while new ones keep arriving (a burst): one that stalls its body holds no answer back."""
        now = time.monotonic()
        arriving = self.serving > 0 and now - self.last_start < self.stall_s
        return arriving or now - self.last_done < self.settle_s
