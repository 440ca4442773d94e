"""The work after the acknowledgement runs on its own thread and event loop, and yields to acknowledgements.

Slack wants every request acknowledged within 3 seconds. If answers (Bolt's dispatch, Slack and Kubernetes
round trips, prompt building, the model call) shared the acknowledging event loop, a burst of mentions would
queue each new acknowledgement behind the earlier answers' work. On a loop of their own they still share the
interpreter (the GIL) and the CPU, so new work also waits, for at most `max_defer_s`, while the server is
busy answering requests: in a burst, every mention is acknowledged first and answered right after.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any

import aiohttp
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

LOG = logging.getLogger(__name__)
# A 429 is waited out (Retry-After, plus up to a second of jitter) this many times before a call with no
# `DEADLINE` fails (one with a deadline retries until it): Slack allows about one message a second per
# channel, and a burst of mentions in one channel queues.
RATE_LIMIT_RETRIES = 10
# The monotonic time by which the work at hand (a mention's answer) must be done; None: no deadline. A 429
# whose Retry-After ends later is not waited out: the caller apologises, saying why, instead.
DEADLINE: ContextVar[float | None] = ContextVar("doppel_slack_deadline", default=None)


class DeadlineRateLimitRetryHandler(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's 429 handler (waits `Retry-After`, then retries), within the current `DEADLINE`. Under a
    deadline only the deadline bounds the retries: in a burst of mentions, dozens of reads wait on one
    Tier 3 bucket (50 a minute), and a count would give up, with an apology, long before the deadline."""

    async def can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        deadline = DEADLINE.get()
        if deadline is None:  # the count applies
            return await super().can_retry_async(state=state, request=request, response=response, error=error)
        if response is None or response.status_code != 429:
            return False
        after = next((v for k, v in response.headers.items() if k.lower() == "retry-after"), ["1"])
        wait = int(after[0]) if str(after[0]).isdecimal() else 1
        return time.monotonic() + wait < deadline


def slack_retry_handlers() -> list[AsyncRetryHandler]:
    """slack_sdk's own retry handlers for every Slack call the bot makes: rate limits (waited out within
    the `DEADLINE` of the work at hand), dropped connections and Slack's 5xx answers are retried instead of
    losing the reply."""
    return [
        DeadlineRateLimitRetryHandler(max_retry_count=RATE_LIMIT_RETRIES),
        AsyncConnectionErrorRetryHandler(max_retry_count=2),
        AsyncServerErrorRetryHandler(max_retry_count=2),
    ]


class Worker:
    """Runs submitted coroutines on a background event loop. Nothing bounds them here: an answer waiting
    for its channel's turn to post (Slack allows about one message a second per channel) must not hold up
    answers in other channels; the model requests are bounded where they are made.

    While `busy()` says the server is answering requests, work submitted from another thread (the
    acknowledging loop) is held there and handed over in one batch once the server is quiet, or
    `max_defer_s` later (checked every `poll_s`): in a burst, the worker's thread does not wake, and take
    the interpreter from the acknowledgements, once per event.
    """

    def __init__(self, max_defer_s: float = 1.0, poll_s: float = 0.005) -> None:
        self.max_defer_s = max_defer_s
        self.poll_s = poll_s
        self.busy: Callable[[], bool] = lambda: False
        self.on_error: Callable[[BaseException], None] | None = None  # told of each failure (metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # the worker's loop only
        self._deferred: list[tuple[Coroutine[Any, Any, Any], str]] = []  # under _lock
        self._flusher: asyncio.Task[None] | None = None  # on the submitting loop
        self._session: aiohttp.ClientSession | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    ready.set()
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="doppel-bot-worker", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        """Schedule `work`; failures are logged with `what`, never raised to the caller."""
        if threading.current_thread() is not self._thread and self.busy():
            with self._lock:
                self._deferred.append((work, what))
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._hand_over_when_quiet())
            return
        self._hand_over([(work, what)])

    async def _hand_over_when_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_defer_s
        try:
            while self.busy() and loop.time() < deadline:
                await asyncio.sleep(self.poll_s)
        finally:
            self._flusher = None
            self._hand_over_deferred()

    def _hand_over_deferred(self) -> None:
        with self._lock:
            batch, self._deferred = self._deferred, []
        if batch:
            self._hand_over(batch)

    def _hand_over(self, batch: list[tuple[Coroutine[Any, Any, Any], str]]) -> None:
        loop = self._start()

        def start() -> None:
            for work, what in batch:
                task = loop.create_task(self._guarded(work, what))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        if threading.current_thread() is self._thread:
            start()
        else:
            loop.call_soon_threadsafe(start)

    async def _guarded(self, work: Coroutine[Any, Any, Any], what: str) -> None:
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
        """Hand over what is held, let running work finish (up to `timeout`; what is still running then is
        cancelled), then stop the loop."""
        flusher = self._flusher
        if flusher is not None:
            flusher.get_loop().call_soon_threadsafe(flusher.cancel)
        self._hand_over_deferred()
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._drain(timeout), self._loop).result(timeout + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._loop = None

    async def _drain(self, timeout: float) -> None:
        await asyncio.sleep(0)  # let a batch handed over just now start
        deadline = asyncio.get_running_loop().time() + timeout
        # Work may submit more work (an event's dispatch submits its answer): wait for that too.
        while self._tasks and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
