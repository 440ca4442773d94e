"""The bot's worker: answers run on its own loop, and wait while the server is acknowledging requests."""

from __future__ import annotations

import asyncio
import threading
import time

from doppel.bot.worker import Worker


async def wait_for(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_work_waits_while_the_server_is_busy_and_starts_once_it_is_quiet() -> None:
    worker = Worker(max_defer_s=30.0)
    busy = True
    worker.busy = lambda: busy
    started: list[tuple[int, str]] = []

    async def job(number: int) -> None:
        started.append((number, threading.current_thread().name))

    try:
        for number in range(3):
            worker.submit(job(number), f"job {number}")
        await asyncio.sleep(0.2)
        assert started == []  # held while requests are being answered
        busy = False
        await wait_for(lambda: len(started) == 3)
        assert sorted(started) == [(n, "doppel-bot-worker") for n in range(3)]
    finally:
        await asyncio.to_thread(worker.close)


async def test_work_is_held_at_most_max_defer_s_under_endless_load() -> None:
    worker = Worker(max_defer_s=0.3)
    worker.busy = lambda: True
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def job() -> None:
        loop.call_soon_threadsafe(done.set)

    try:
        submitted = time.monotonic()
        worker.submit(job(), "job")
        await asyncio.wait_for(done.wait(), 5)
        assert 0.25 <= time.monotonic() - submitted < 3
    finally:
        await asyncio.to_thread(worker.close)


async def test_close_runs_what_is_held_and_cancels_what_outlives_the_timeout() -> None:
    worker = Worker(max_defer_s=30.0)
    worker.busy = lambda: True
    ran: list[str] = []

    async def quick() -> None:
        ran.append("quick")

    async def endless() -> None:
        ran.append("endless")
        await asyncio.sleep(3600)

    worker.submit(quick(), "quick")
    worker.submit(endless(), "endless")
    started = time.monotonic()
    await asyncio.to_thread(worker.close, 0.5)
    assert sorted(ran) == ["endless", "quick"] and time.monotonic() - started < 5
