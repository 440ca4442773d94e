"""The HTTP connection guard under the intake: uvicorn's httptools protocol with a deadline for each
request's line and headers and a cap on their size. uvicorn has neither (its keep-alive timeout only runs
between requests), so a client that sends a request line and then trickles or withholds its headers would
hold a connection forever (slowloris). Bodies are bounded by the intake (`doppel.bot.intake`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Slack's request line and headers arrive in one packet; a client still sending them after this is not
# Slack, and neither are headers this large.
HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 32 * 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """httptools' protocol that answers 408 to headers not complete within `HEADER_TIMEOUT_S` of a
    request's first byte (or of the connection) and 431 to headers over `MAX_HEADER_BYTES`, then closes."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._in_headers = True
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout_s, self._late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            end = data.find(b"\r\n\r\n")
            self._header_bytes += end + 4 if end >= 0 else len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, "request headers too large")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        if self._deadline is None:  # the next request on a kept-alive connection
            self._deadline = self.loop.call_later(self.header_timeout_s, self._late)

    def on_headers_complete(self) -> None:
        self._in_headers, self._header_bytes = False, 0
        self._disarm()
        super().on_headers_complete()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if self._in_headers and not self.transport.is_closing():
            self._refuse(408, "request headers not received in time")

    def _refuse(self, status: int, text: str) -> None:
        reason = {408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
        body = text.encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self._in_headers = False
        self.transport.write(head.encode() + body)
        self.transport.close()
