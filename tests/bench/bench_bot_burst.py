"""Benchmark: bursts of simultaneous @mentions under Slack's own rate limits, in real time (issue 27).

The bot runs as in production (`doppel bot`, its own process, with the kmock Kubernetes emulator in
another; `bench_bot.running_bot`) against the Slack Web API emulator at Slack's documented limits, not
compressed: chat.postMessage about one message a second per channel (a short burst allowed), users.info
Tier 4, conversations.info/history/replies Tier 3 (50 a minute). The model server answers at once
(`bench_bot.ModelStandIn`): what is measured is the bot's and Slack's part. For one mention alone (a few
times, the bot idle and Slack's buckets full), then 8 and then 40 mentions by five people in one channel
sent at once, prints:
- the answer time (event sent -> its reply posted) p50/p99, and its ratio to one mention alone's p50;
- mentions lost (neither an answer nor an apology posted in their thread within the bot's deadline,
  `mentions.MENTION_DEADLINE_S`; the goal: 0) and apologies (the goal: 0 when Slack's limits allow);
- how many Slack calls were answered 429 (and retried after `Retry-After`), and the time Slack's limits
  alone need for the burst (its floor), against the last answer's.
Between the runs the bench waits for Slack's buckets to fill again. About two minutes in all.

Run: .venv/bin/python tests/bench/bench_bot_burst.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_bot import ModelStandIn, burst, mention_request, percentile, running_bot
from tests.support.slack_emulator import POST_PER_MINUTE_PER_CHANNEL, SlackEmulator
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID, load_workspace

from doppel.bot.mentions import MENTION_DEADLINE_S

BURSTS = (8, 40)
SINGLES = 5
PEOPLE = ("U02BOB", "U03CAROL", "U04DAVE", "U05SAML", "U06SAMP")
# Slack's buckets are full again after this long (Tier 3's burst is a few seconds' worth of calls).
REFILL_S = 8.0


class Mentions:
    """Sends mentions numbered from 0 (`q<i>` in their text) and waits for the bot's post in each thread."""

    def __init__(self, emulator: SlackEmulator, bot_url: str) -> None:
        self.emulator, self.bot_url = emulator, bot_url
        self.count = 0

    async def send(self, n: int) -> dict[str, float]:
        """`n` mentions at once; thread ts -> when its event was sent."""
        numbers = range(self.count, self.count + n)
        self.count += n
        made = [
            mention_request(
                self.emulator, f"<@{BOT_USER_ID}> as alice question q{i}", f"EvBurst{i:04d}", PEOPLE[i % 5]
            )
            for i in numbers
        ]
        sent = await burst(self.bot_url, [request for _, request in made])
        statuses = {status for _, _, status in sent}
        if statuses != {200}:
            raise SystemExit(f"events not acknowledged: HTTP {sorted(statuses)}")
        return {ts: at for (ts, _), (at, _, _) in zip(made, sent, strict=True)}

    async def answered(self, sent: dict[str, float]) -> tuple[list[float], Counter[str], int]:
        """Wait (up to the bot's deadline and a little) for a post in every thread: (answer times of the
        answers, apologies, mentions with no post at all)."""
        deadline = time.monotonic() + MENTION_DEADLINE_S + 15
        while time.monotonic() < deadline and len(self._firsts(sent)) < len(sent):
            await asyncio.sleep(0.05)
        firsts = self._firsts(sent)
        times = [at - sent[ts] for ts, (at, text) in firsts.items() if text.startswith("answer ")]
        apologies = Counter(text for _, text in firsts.values() if not text.startswith("answer "))
        return times, apologies, len(sent) - len(firsts)

    def _firsts(self, sent: dict[str, float]) -> dict[str, tuple[float, str]]:
        """Thread ts -> (when, text) of the bot's first successful post in it."""
        firsts: dict[str, tuple[float, str]] = {}
        for call in self.emulator.calls_to("chat.postMessage"):
            thread = str(call.params.get("thread_ts"))
            if call.status == 200 and call.error is None and thread in sent and thread not in firsts:
                firsts[thread] = (call.time, str(call.params.get("text")))
        return firsts


def slack_floor(emulator: SlackEmulator, n: int) -> float:
    """Seconds Slack's limits alone need for `n` mentions in one channel, each one conversations.history
    read (Tier 3) and one post (about one a second per channel), after the buckets' bursts."""
    floor = 0.0
    for per_minute in (emulator.allowed_per_minute("conversations.history"), POST_PER_MINUTE_PER_CHANNEL):
        rate = per_minute / 60
        floor = max(floor, (n - max(1.0, rate * emulator.burst_seconds)) / rate)
    return floor


async def main() -> None:
    emulator = SlackEmulator().start()  # Slack's limits as documented, in real seconds
    emulator.add_team(load_workspace(), token=ACME_TOKEN, bot_user_id=BOT_USER_ID)
    model = ModelStandIn()
    model.start()
    async with running_bot(emulator, model) as stack:
        mentions = Mentions(emulator, stack.bot_url)
        await mentions.answered(await mentions.send(1))  # warm-up: auth.test, connections, look-ups
        singles: list[float] = []
        for _ in range(SINGLES):
            await asyncio.sleep(1.2)  # the channel's post allowance back
            times, apologies, lost = await mentions.answered(await mentions.send(1))
            if apologies.total() or lost:
                raise SystemExit("one mention alone was not answered")
            singles += times
        single = percentile(singles, 0.5)
        print(f"one mention alone ({SINGLES} times, the bot idle): answer p50 {single * 1000:.0f} ms")
        for n in BURSTS:
            await asyncio.sleep(REFILL_S)
            before = sum(1 for call in emulator.calls if call.status == 429)
            times, apologies, lost = await mentions.answered(await mentions.send(n))
            limited = sum(1 for call in emulator.calls if call.status == 429) - before
            line = f"{n} mentions at once: answered {len(times)}, apologies {apologies.total()}, lost {lost}"
            if times:
                p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
                line += (
                    f"; answer p50 {p50:.2f} s ({p50 / single:.0f}x one alone), "
                    f"p99 {p99:.2f} s ({p99 / single:.0f}x); the last {max(times):.1f} s after the burst"
                )
            print(line)
            if times:
                floor = slack_floor(emulator, n)
                ratio = max(times) / floor
                print(f"  Slack's limits alone need {floor:.1f} s: the last answer / that = {ratio:.2f}x")
            for text, count in apologies.items():
                print(f"  apology x{count}: {text[:70]}")
            print(f"  Slack calls answered 429 (then retried after Retry-After): {limited}")
    emulator.stop()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average {load}")


if __name__ == "__main__":
    asyncio.run(main())
