"""The work after the acknowledgement runs on its own thread and event loop.

Slack wants every request acknowledged within 3 seconds. If answers (Slack and Kubernetes round trips,
prompt building, the model call) shared the acknowledging event loop, a burst of mentions would queue each
new acknowledgement behind the earlier answers' work. On a loop of their own they only share the CPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)

LOG = logging.getLogger(__name__)
# A 429 is waited out (Retry-After, plus up to a second of jitter) this many times before a call fails:
# Slack allows about one message a second per channel, and a burst of mentions in one channel queues.
RATE_LIMIT_RETRIES = 10


def slack_retry_handlers() -> list[AsyncRetryHandler]:
    """slack_sdk's own retry handlers for every Slack call the bot makes: rate limits, dropped connections
    and Slack's 5xx answers are retried instead of losing the reply."""
    return [
        AsyncRateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES),
        AsyncConnectionErrorRetryHandler(max_retry_count=2),
        AsyncServerErrorRetryHandler(max_retry_count=2),
    ]


class Worker:
    """Runs submitted coroutines on a background event loop, at most `concurrency` at a time."""

    def __init__(self, concurrency: int = 64) -> None:
        self.concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.on_error: Callable[[BaseException], None] | None = None  # told of each failure (metrics)

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    self._slots = asyncio.Semaphore(self.concurrency)
                    ready.set()
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="doppel-bot-worker", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, work: Coroutine[Any, Any, Any], what: str) -> concurrent.futures.Future[Any]:
        """Schedule `work`; failures are logged with `what`, never raised to the caller."""
        future = asyncio.run_coroutine_threadsafe(self._guarded(work, what), self._start())
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    async def _guarded(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        assert self._slots is not None
        async with self._slots:
            try:
                await work
            except Exception as exc:
                LOG.exception("%s failed", what)
                if self.on_error is not None:
                    self.on_error(exc)

    def session(self) -> aiohttp.ClientSession:
        """One HTTP session for the answers' Slack calls (kept-alive connections); call it from the worker's
        own loop only."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def close(self, timeout: float = 10.0) -> None:
        """Let running work finish (up to `timeout`), then stop the loop."""
        if self._loop is None:
            return
        concurrent.futures.wait(list(self._pending), timeout=timeout)
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(timeout)
            self._session = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._loop = None
