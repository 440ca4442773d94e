"""The bot's /metrics, scraped as Prometheus would, follow what happened in Slack.

The real bot under uvicorn with its metrics port, events signed as Slack signs them, the Slack emulator
and kmock. The model is the pluggable chat backend: it answers, or fails as an unreachable vLLM does.
"""

from __future__ import annotations

import asyncio
import json

from tests.support.bot_fixtures import (
    CHANNEL,
    NAMESPACE,
    TEAM_ID,
    bot_config,
    doppel_body,
    kube_for,
    mention_payload,
    say,
    sign,
)
from tests.support.metrics import free_port, scrape, value
from tests.support.slack_fixtures import BOT_USER_ID

from doppel.serve.errors import ServerUnavailable


async def test_metrics_count_events_once_replies_and_errors(bot_harness, bot_kube, slack_emulator):
    async def chat(model, messages):
        if "down" in messages[-1]["content"]:
            raise ServerUnavailable("connection refused")
        return "sure, 5pm"

    port = free_port()
    bot = await bot_harness(bot_config(metrics_port=port, metrics_addr="127.0.0.1"), chat=chat)
    await kube_for(bot_kube[1]).create_doppel(
        NAMESPACE, doppel_body("alice", "U01ALICE", served_name="alice-v1")
    )
    before = await scrape(port)
    assert value(before, "doppel_bot_events_received_total", type="app_mention", team=TEAM_ID) == 0

    # A mention, then Slack's retry of the same event (as Slack sends it when the ack was late).
    ts = say(slack_emulator, "U02BOB", f"<@{BOT_USER_ID}> is it 5pm?")
    payload = mention_payload(f"<@{BOT_USER_ID}> is it 5pm?", ts, event_id="EvMetrics1")
    assert (await bot.event(payload)).status_code == 200
    await bot.wait_posts(CHANNEL, 1)
    body = json.dumps(payload)
    headers = {
        "Content-Type": "application/json",
        "X-Slack-Retry-Num": "1",
        "X-Slack-Retry-Reason": "http_timeout",
    }
    assert (
        await bot.http.post("/slack/events", content=body, headers={**headers, **sign(body)})
    ).status_code == 200
    # The model server is down: an apology, counted as a vLLM error.
    down = say(slack_emulator, "U02BOB", f"<@{BOT_USER_ID}> vllm is down?")
    assert (
        await bot.event(mention_payload(f"<@{BOT_USER_ID}> vllm is down?", down, event_id="EvMetrics2"))
    ).status_code == 200
    await bot.wait_posts(CHANNEL, 2)
    # A channel Slack does not know: the thread cannot be read, a Slack error.
    lost = say(slack_emulator, "U02BOB", f"<@{BOT_USER_ID}> anyone?")
    lost_payload = mention_payload("y", lost, event_id="EvMetrics3", channel="C0NOWHERE")
    assert (await bot.event(lost_payload)).status_code == 200

    for _ in range(100):
        after = await scrape(port)
        if value(after, "doppel_bot_errors_total", kind="slack") >= 1:
            break
        await asyncio.sleep(0.1)
    assert value(after, "doppel_bot_events_received_total", type="app_mention", team=TEAM_ID) == 4
    assert value(after, "doppel_bot_events_deduplicated_total", type="app_mention") == 1
    assert value(after, "doppel_bot_ack_seconds_count") == 4
    assert 0 < value(after, "doppel_bot_ack_seconds_sum") < 4 * 3.0
    # The retried event was answered (and counted) once: one answer, one apology.
    posts = slack_emulator.posted(CHANNEL)
    assert [p["thread_ts"] for p in posts] == [ts, down] and "can't answer right now" in posts[1]["text"]
    assert value(after, "doppel_bot_replies_posted_total", team=TEAM_ID) == 2
    assert value(after, "doppel_bot_first_reply_seconds_count") == 2
    assert value(after, "doppel_bot_errors_total", kind="vllm_unavailable") == 1
    assert value(after, "doppel_bot_errors_total", kind="slack") == 1


async def test_metrics_port_zero_serves_nothing(bot_harness, bot_kube):
    bot = await bot_harness(bot_config(metrics_port=0))
    assert not bot.bot.deps.metrics.enabled and bot.bot.deps.metrics._exporter is None
