"""The bot when the model pool is cold: a mention that finds no vLLM pod ready is acknowledged, told once that
the doppel is waking up, held durably, and answered once a pod is ready; or apologised for at the deadline.

The real bot under uvicorn, events signed as Slack signs them, the Slack emulator, kmock (where held
mentions are kept, as ConfigMaps in the bot's namespace), and the real vLLM CPU server: stopped and started
again on its port (a pool scaled to zero and woken), or behind a closed then opened `TcpGate`. vLLM's own
request counter says how many replies it generated: exactly one per held mention.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from tests.support.bot_fixtures import (
    BOT_NAMESPACE,
    CHANNEL,
    NAMESPACE,
    TcpGate,
    bot_config,
    doppel_body,
    kube_for,
    mention_payload,
    say,
)
from tests.support.metrics import free_port, scrape, value
from tests.support.slack_fixtures import BOT_USER_ID

from doppel.bot.held import LABEL_HELD, SqlHeldStore

POLL_S = 0.2


async def held_records(url: str) -> list[dict[str, str]]:
    return await kube_for(url).list_configmaps(BOT_NAMESPACE, f"{LABEL_HELD}=true")


# A reply is two chat completions: its sampled first token, then the rest (opening_temperature).
REQUESTS_PER_REPLY = 2


async def vllm_replies(port: int) -> float:
    """Replies the vLLM server generated since it started (its own Prometheus counter of finished chat
    completions, REQUESTS_PER_REPLY a reply)."""
    samples = await scrape(port)
    finished = sum(v for (name, _), v in samples.items() if name == "vllm:request_success_total")
    return finished / REQUESTS_PER_REPLY


def notes(posts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in posts if "waking up" in p["text"]]


async def mention(bot: Any, emulator: Any, text: str, event_id: str) -> str:
    ts = say(emulator, "U02BOB", f"<@{BOT_USER_ID}> {text}")
    started = time.monotonic()
    response = await bot.event(mention_payload(f"<@{BOT_USER_ID}> {text}", ts, event_id=event_id))
    assert response.status_code == 200 and time.monotonic() - started < 3.0  # acknowledged at once
    return ts


@pytest.mark.vllm
async def test_a_mention_to_a_pool_at_zero_is_answered_once_when_vllm_starts(
    bot_harness, bot_kube, slack_emulator, vllm_server
):
    await asyncio.to_thread(vllm_server.stop)  # scaled to zero: nothing listens on the pool's port
    bot = await bot_harness(bot_config(vllm_url=vllm_server.base_url, wake_poll_s=POLL_S))
    await kube_for(bot_kube[1]).create_doppel(
        NAMESPACE, doppel_body("alice", "U01ALICE", served_name="doppel-tiny")
    )
    ts = await mention(bot, slack_emulator, "is the deploy at 5pm?", "EvCold1")

    (note,) = await bot.wait_posts(CHANNEL, 1, timeout=15)
    assert note["thread_ts"] == ts and "username" not in note  # the bot's own voice, in the thread
    assert note["text"].startswith("alice's doppel is waking up") and "about 3 minutes" in note["text"]
    assert len(await held_records(bot_kube[1])) == 1
    # Slack delivers the event again (a retry): still one note, one held mention.
    await bot.event(mention_payload(f"<@{BOT_USER_ID}> again", ts, event_id="EvCold1"))
    await asyncio.sleep(5 * POLL_S)
    assert len(slack_emulator.posted(CHANNEL)) == 1

    await asyncio.to_thread(vllm_server.start)  # a pod is ready
    posts = await bot.wait_posts(CHANNEL, 2, timeout=120)
    await asyncio.sleep(10 * POLL_S)  # more ticks: nothing more comes
    posts = slack_emulator.posted(CHANNEL)
    assert len(notes(posts)) == 1
    answer = [p for p in posts if p.get("username") == "alice-bot"]
    assert answer and all(p["thread_ts"] == ts for p in answer)
    assert await vllm_replies(vllm_server.port) == 1  # generated once
    assert await held_records(bot_kube[1]) == []
    # vLLM exports the queue the autoscaler reads (vllm.autoscaling.keda's second trigger).
    assert any(name == "vllm:num_requests_waiting" for name, _ in await scrape(vllm_server.port))


@pytest.mark.vllm
async def test_a_bot_restart_while_waiting_loses_nothing(bot_harness, bot_kube, slack_emulator, vllm_server):
    gate = TcpGate(vllm_server.port)  # closed: no pod ready
    config = bot_config(vllm_url=gate.url, wake_poll_s=POLL_S)
    first = await bot_harness(config)
    await kube_for(bot_kube[1]).create_doppel(
        NAMESPACE, doppel_body("alice", "U01ALICE", served_name="doppel-tiny")
    )
    ts = await mention(first, slack_emulator, "still there?", "EvColdRestart")
    await first.wait_posts(CHANNEL, 1, timeout=15)
    await first.stop()  # the bot pod is replaced while the pool sleeps
    assert len(await held_records(bot_kube[1])) == 1

    second = await bot_harness(config)
    before = await vllm_replies(vllm_server.port)
    await gate.open()
    try:
        posts = await second.wait_posts(CHANNEL, 2, timeout=120)
        await asyncio.sleep(10 * POLL_S)
        posts = slack_emulator.posted(CHANNEL)
        assert len(notes(posts)) == 1
        assert [p["thread_ts"] for p in posts if p.get("username") == "alice-bot"][:1] == [ts]
        assert await vllm_replies(vllm_server.port) == before + 1
        assert await held_records(bot_kube[1]) == []
    finally:
        await gate.close()


@pytest.mark.parametrize("store", ["kube", "sql"])
async def test_a_mention_held_past_the_deadline_gets_an_apology(
    bot_harness, bot_kube, slack_emulator, tmp_path, store
):
    port = free_port()
    database = f"sqlite:///{tmp_path / 'bot.db'}" if store == "sql" else None

    async def held() -> list[Any]:
        if database:
            return await SqlHeldStore(database).list()
        return await held_records(bot_kube[1])

    config = bot_config(
        database_url=database,
        vllm_url=f"http://127.0.0.1:{free_port()}",  # a pool that never wakes
        wake_poll_s=POLL_S,
        wake_deadline_s=3.0,
        metrics_port=port,
        metrics_addr="127.0.0.1",
    )
    bot = await bot_harness(config)
    await kube_for(bot_kube[1]).create_doppel(
        NAMESPACE, doppel_body("alice", "U01ALICE", served_name="doppel-tiny")
    )
    ts = await mention(bot, slack_emulator, "anyone?", "EvColdLate")
    (note,) = await bot.wait_posts(CHANNEL, 1, timeout=15)
    assert "waking up" in note["text"]
    # The autoscaler's signal: one mention waits for the pool.
    assert value(await scrape(port), "doppel_bot_mentions_waiting") == 1
    assert len(await held()) == 1

    posts = await bot.wait_posts(CHANNEL, 2, timeout=30)
    apology = posts[1]
    assert apology["thread_ts"] == ts and "username" not in apology
    assert apology["text"].startswith("Sorry, alice's doppel could not wake up in time")
    assert time.time() - float(ts) >= 3.0
    await asyncio.sleep(10 * POLL_S)
    assert len(slack_emulator.posted(CHANNEL)) == 2  # said once
    assert await held() == []
    for _ in range(50):
        if value(await scrape(port), "doppel_bot_mentions_waiting") == 0:
            break
        await asyncio.sleep(POLL_S)
    assert value(await scrape(port), "doppel_bot_mentions_waiting") == 0
