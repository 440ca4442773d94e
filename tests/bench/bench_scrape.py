"""Benchmark: scraping 20 channels x 100 threads through the Slack Web API emulator.

Slack's Tier-3 limit (50 calls/min per method) is scaled up so the concurrent scrape takes well under a
minute; the emulator answers each call after a simulated round trip, as Slack does. Prints:
- conversations.replies calls/minute achieved, as a fraction of the (scaled) Tier-3 ceiling (target >= 0.8);
- the speed-up over a one-channel-at-a-time scrape (max_concurrency=1) of the same workspace;
- the calls of a re-run looking 31 days back (the threads are 28 to 30 days old) after a few threads got
  a late reply, against the first run's and against re-fetching every thread of that window;
- messages/s of sample building (windows, normalisation, samples) with scrubbing on vs off, and the
  scrubbed build's time against the time Slack's real (unscaled) Tier-3 limit takes to fetch the same
  workspace: scrubbing must not be what a real scrape waits on.

Run: .venv/bin/python tests/bench/bench_scrape.py  (only the sample building: ... bench_scrape.py samples)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.slack_emulator import SlackEmulator

from doppel.slack.samples import Person, ScrapeOptions, build_samples, threads_from_messages
from doppel.slack.scrape import PER_MINUTE, ApiSettings, scrape_api

CHANNELS = 20
THREADS = 100
REPLIES = 2
RATE_SCALE = 90.0  # Tier 3: 50/min -> 75 calls/s
LATENCY = 0.05  # seconds per answer, a typical round trip to Slack
CONCURRENCY = 8
TOKEN = "xoxb-bench"


def synthetic_workspace(now: float) -> dict[str, Any]:
    users = [
        {"id": f"U{i:03d}", "team_id": "TBENCH", "name": f"user{i}", "profile": {"display_name": f"user{i}"}}
        for i in range(5)
    ]
    channels, messages = [], {}
    start = int(now) - 30 * 86400
    for c in range(CHANNELS):
        name = f"channel-{c:02d}"
        channels.append({"id": f"C{c:03d}", "name": name, "members": []})
        msgs = []
        for t in range(THREADS):
            root = f"{start + c * 10_000 + t * 60}.000100"
            msgs.append({"type": "message", "ts": root, "user": "U001", "text": f"question {t} in {name}?"})
            for r in range(REPLIES):
                msgs.append(
                    {
                        "type": "message",
                        "ts": f"{start + c * 10_000 + t * 60 + r + 1}.000200",
                        "thread_ts": root,
                        "user": "U000" if r == 0 else "U002",
                        "text": f"An answer to question {t} in <#C{c:03d}|{name}>, " + "long enough " * 10,
                    }
                )
        messages[name] = msgs
    return {
        "team": {"id": "TBENCH", "name": "Bench"},
        "users": users,
        "channels": channels,
        "messages": messages,
    }


def run(concurrency: int, workspace: dict[str, Any]) -> tuple[float, SlackEmulator, int]:
    with SlackEmulator(rate_scale=RATE_SCALE, latency=LATENCY) as emulator:
        emulator.add_team(workspace, token=TOKEN)
        out = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
        settings = ApiSettings(base_url=emulator.base_url, max_concurrency=concurrency, rate_scale=RATE_SCALE)
        options = ScrapeOptions(max_samples=10_000)
        started = time.monotonic()
        manifest = scrape_api(TOKEN, "user0", out, options, settings)
        return time.monotonic() - started, emulator, manifest.samples


def incremental(workspace: dict[str, Any], late_replies: int = 5) -> None:
    """A first run, then late replies to a few threads, then a re-run whose window covers every thread."""
    with SlackEmulator(rate_scale=RATE_SCALE, latency=LATENCY) as emulator:
        emulator.add_team(workspace, token=TOKEN)
        out = Path(tempfile.mkdtemp(prefix="bench-scrape-incremental-"))
        settings = ApiSettings(
            base_url=emulator.base_url, max_concurrency=CONCURRENCY, rate_scale=RATE_SCALE, rescan_days=31
        )
        options = ScrapeOptions(max_samples=10_000)
        scrape_api(TOKEN, "user0", out, options, settings)
        first_calls = len(emulator.calls)
        now = int(time.time())
        for i in range(late_replies):
            root = workspace["messages"][f"channel-{i:02d}"][0]["ts"]
            reply = {"ts": f"{now - 60 + i}.000300", "thread_ts": root, "user": "U000", "text": "late " * 30}
            emulator.add_message(f"C{i:03d}", {"type": "message", **reply})
        started = time.monotonic()
        manifest = scrape_api(TOKEN, "user0", out, options, settings)
        rerun_s = time.monotonic() - started
        calls = emulator.calls[first_calls:]
    fetched = sum(1 for c in calls if c.method == "conversations.replies")
    every_thread = CHANNELS * THREADS
    print(
        f"re-run with {late_replies} late replies, 31-day window: {len(calls)} calls in {rerun_s:.1f} s, "
        f"{manifest.added} samples added, {fetched} threads fetched; "
        f"{len(calls) / first_calls:.3f} of the first run's {first_calls} calls, "
        f"{fetched / every_thread:.4f} of re-fetching all {every_thread} threads"
    )


def sample_building(workspace: dict[str, Any], rounds: int = 3) -> None:
    """Sample building alone, from the same messages the scrape fetches, scrubbing on and off."""
    threads = [
        t
        for c in workspace["channels"]
        for t in threads_from_messages(c["id"], c["name"], workspace["messages"][c["name"]], 0)
    ]
    names = {c["id"]: c["name"] for c in workspace["channels"]}
    count = sum(len(t.messages) for t in threads)
    person = Person("U000", "user0")
    rates = {}
    for scrub in (False, True):
        options = ScrapeOptions(max_samples=10_000, scrub=scrub)

        def build(options: ScrapeOptions = options) -> None:
            build_samples(threads, person, workspace["users"], names, options, team="T", source="b")

        best = min(_timed(build) for _ in range(rounds))
        rates[scrub] = count / best
        state = "on " if scrub else "off"
        print(f"sample building, scrub {state}: {count / best:,.0f} messages/s ({best:.2f} s)")
    # What the Web API fetch of this workspace takes at Slack's real Tier-3 limit (50/min per method).
    calls = CHANNELS * THREADS + CHANNELS
    fetch_s = calls / PER_MINUTE["conversations.replies"] * 60
    scrubbed_s = count / rates[True]
    print(
        f"scrubbing costs {rates[False] / rates[True]:.2f}x the unscrubbed build; the scrubbed build takes "
        f"{scrubbed_s:.1f} s = {scrubbed_s / fetch_s:.4f} of the {fetch_s:,.0f} s the rate-limited fetch of "
        f"the same {count} messages takes"
    )


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    workspace = synthetic_workspace(time.time())
    if sys.argv[1:] == ["samples"]:
        sample_building(workspace)
        return
    ceiling = PER_MINUTE["conversations.replies"] * RATE_SCALE
    concurrent_s, emulator, samples = run(CONCURRENCY, workspace)
    replies = [c.time for c in emulator.calls_to("conversations.replies")]
    limited = sum(1 for c in emulator.calls if c.status == 429)
    per_minute = (len(replies) - 1) / (replies[-1] - replies[0]) * 60
    print(
        f"workspace: {CHANNELS} channels x {THREADS} threads, {len(emulator.calls)} calls, {samples} samples"
    )
    print(f"concurrent scrape (max_concurrency={CONCURRENCY}): {concurrent_s:.1f} s, {limited} answered 429")
    print(
        f"conversations.replies: {per_minute:.0f} calls/min of a {ceiling:.0f}/min ceiling "
        f"= {per_minute / ceiling:.2f} of the rate limit (target >= 0.8)"
    )
    sequential_s, _, sequential_samples = run(1, workspace)
    assert sequential_samples == samples
    print(f"one channel at a time: {sequential_s:.1f} s")
    print(f"speed-up of the concurrent scrape: {sequential_s / concurrent_s:.2f}x")
    incremental(workspace)
    sample_building(workspace)


if __name__ == "__main__":
    main()
