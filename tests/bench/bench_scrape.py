"""Benchmark: scraping 20 channels x 100 threads of the demo workspace (its builder, doppel.demo.workspace)
through the Slack Web API emulator, as its demo person Margaret.

Slack's Tier-3 limit (50 calls/min per method) is scaled up so the concurrent scrape takes well under a
minute; the emulator answers each call after a simulated round trip, as Slack does. Prints:
- conversations.replies calls/minute achieved, as a fraction of the (scaled) Tier-3 ceiling (target >= 0.8);
- the speed-up over a one-channel-at-a-time scrape (max_concurrency=1) of the same workspace;
- the calls of a re-run looking 31 days back (the threads are 28 to 30 days old) after a few threads got
  a late reply, against the first run's and against re-fetching every thread of that window;
- under each of Slack's rate profiles (internal app, Marketplace app, distributed non-Marketplace app), time
  compressed so that conversations.history/replies allow 2 calls/s, the default scrape (which starts from
  the internal app's limits) and one told the profile: achieved over allowed rate of conversations.replies,
  the bottleneck (goal >= 0.9), the 429s answered, the wall time against the profile's floor (the fewest
  calls the pages allow, at the allowed rate), and what the scrape would take against Slack itself;
- a non-Marketplace scrape killed mid-channel and resumed: how many history pages and threads per channel
  it fetched again (goal: at most one page batch).
- messages/s of sample building (windows, normalisation, samples) with scrubbing on vs off, and the
  scrubbed build's time against the time Slack's real (unscaled) Tier-3 limit takes to fetch the same
  workspace: scrubbing must not be what a real scrape waits on.

Run: .venv/bin/python tests/bench/bench_scrape.py  (only the sample building: ... bench_scrape.py samples)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.slack_emulator import SlackEmulator
from tests.support.synthetic_slack import synthetic_workspace as small_workspace

from doppel.demo.workspace import MARGARET, TEAM_ID, build_workspace
from doppel.slack.ratelimit import PROFILES
from doppel.slack.samples import Person, ScrapeOptions, build_samples, threads_from_messages
from doppel.slack.scrape import ApiSettings, scrape_api

PER_MINUTE = PROFILES["internal"].per_minute

CHANNELS = 20
THREADS = 100
REPLIES = 2
RATE_SCALE = 90.0  # Tier 3: 50/min -> 75 calls/s
LATENCY = 0.05  # seconds per answer, a typical round trip to Slack
CONCURRENCY = 8
TOKEN = "xoxb-bench"


# Thread metadata of a root: the emulator derives it from the replies, as Slack does.
ROOT_FIELDS = ("thread_ts", "reply_count", "reply_users_count", "latest_reply", "reply_users", "replies")


def demo_threads(seed: int) -> list[list[dict[str, Any]]]:
    """The threads of the demo workspace built with `seed` (root first, then its replies)."""
    threads: dict[str, list[dict[str, Any]]] = {}
    for name, content in build_workspace(seed).items():
        if "/" in name:  # a channel's day file
            for message in content:
                if "thread_ts" in message:
                    threads.setdefault(message["thread_ts"], []).append(message)
    return [sorted(thread, key=lambda m: float(m["ts"])) for _, thread in sorted(threads.items())]


def synthetic_workspace(now: float) -> dict[str, Any]:
    """CHANNELS x THREADS threads written by the demo workspace's builder (seeds 0, 1, ... until there are
    enough), its people, styles, mentions and broadcasts, moved into channels of their own 28 to 30 days
    back (each channel's threads a minute apart, replies at their own distance from their root)."""
    pool: list[list[dict[str, Any]]] = []
    seed = 0
    while len(pool) < CHANNELS * THREADS:
        pool.extend(demo_threads(seed))
        seed += 1
    start = int(now) - 30 * 86400
    channels, messages, serial = [], {}, 0
    for c in range(CHANNELS):
        name = f"channel-{c:02d}"
        channels.append({"id": f"C{c:03d}", "name": name, "members": []})
        msgs = []
        for t in range(THREADS):
            thread = pool[c * THREADS + t]
            base, root_ts = start + c * 10_000 + t * 60, float(thread[0]["ts"])
            root = ""
            for message in thread:
                serial += 1  # the fraction keeps every ts unique
                moved = {k: v for k, v in message.items() if k not in ROOT_FIELDS}
                moved["ts"] = f"{base + int(float(message['ts']) - root_ts)}.{serial:06d}"
                if root:
                    moved["thread_ts"] = root
                else:
                    root = moved["ts"]
                msgs.append(moved)
        messages[name] = msgs
    users = build_workspace()["users.json"]
    return {
        "team": {"id": TEAM_ID, "name": "Demo"},
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
        manifest = scrape_api(TOKEN, MARGARET.name, out, options, settings)
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
        scrape_api(TOKEN, MARGARET.name, out, options, settings)
        first_calls = len(emulator.calls)
        now = int(time.time())
        for i in range(late_replies):
            root = workspace["messages"][f"channel-{i:02d}"][0]["ts"]
            reply = {
                "ts": f"{now - 60 + i}.000300",
                "thread_ts": root,
                "user": MARGARET.id,
                "text": "late " * 30,
            }
            emulator.add_message(f"C{i:03d}", {"type": "message", **reply})
        started = time.monotonic()
        manifest = scrape_api(TOKEN, MARGARET.name, out, options, settings)
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


LIMITED = ("conversations.history", "conversations.replies")
PROFILE_CHANNELS, PROFILE_THREADS, PROFILE_REPLIES = 4, 20, 2
# Calls/s of history and replies after compression. Kept low so that the scheduling jitter of a loaded
# machine stays as small against the interval between calls as a network's is against Slack's minute.
TARGET_RATE = 2.0


def achieved(emulator: SlackEmulator, method: str) -> float:
    """Accepted calls per second of `method` from its first accepted call to its last."""
    times = [c.time for c in emulator.calls_to(method) if c.status == 200]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def profile_run(slack_profile: str, client_profile: str) -> dict[str, Any]:
    workspace = small_workspace(time.time(), PROFILE_CHANNELS, PROFILE_THREADS, PROFILE_REPLIES)
    probe = SlackEmulator(rate_profile=slack_profile)
    scale = TARGET_RATE * 60 / probe.allowed_per_minute("conversations.history")
    with SlackEmulator(rate_scale=scale, latency=LATENCY, rate_profile=slack_profile) as emulator:
        emulator.add_team(workspace, token=TOKEN)
        out = Path(tempfile.mkdtemp(prefix="bench-scrape-profile-"))
        settings = ApiSettings(
            base_url=emulator.base_url, rate_scale=scale, rate_profile=client_profile, max_concurrency=4
        )
        started = time.monotonic()
        manifest = scrape_api(TOKEN, "user0", out, ScrapeOptions(max_samples=10_000), settings)
        wall = time.monotonic() - started
        allowed = {m: emulator.allowed_per_minute(m) / 60 for m in LIMITED}
        page = {m: emulator.page_cap(m) for m in LIMITED}
        # conversations.replies is the bottleneck (a call a thread); history calls wait on their threads.
        rate = achieved(emulator, "conversations.replies") / allowed["conversations.replies"]
        limited = sum(1 for c in emulator.calls if c.status == 429)
    # The fewest calls the pages allow: history pages of top-level messages, one thread a call or more.
    floor_calls = {
        "conversations.history": PROFILE_CHANNELS
        * math.ceil(PROFILE_THREADS / page["conversations.history"]),
        "conversations.replies": PROFILE_CHANNELS
        * PROFILE_THREADS
        * math.ceil((PROFILE_REPLIES + 1) / page["conversations.replies"]),
    }
    floor = max(floor_calls[m] / allowed[m] for m in LIMITED)
    return {
        "slack": slack_profile,
        "client": client_profile,
        "samples": manifest.samples,
        "rate": rate,
        "limited": limited,
        "wall": wall,
        "floor": floor,
        "slack_time": wall * scale,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def profiles() -> None:
    pairs = [
        ("internal", "internal"),
        ("marketplace", "internal"),
        ("non-marketplace", "internal"),  # the default scrape, learning the limits from 429s
        ("non-marketplace", "non-marketplace"),
    ]
    rows = [profile_run(slack, client) for slack, client in pairs]
    print(
        f"\nrate profiles: {PROFILE_CHANNELS} channels x {PROFILE_THREADS} threads x {PROFILE_REPLIES} "
        "replies, "
        f"history/replies compressed to {TARGET_RATE:.0f} calls/s, {LATENCY * 1000:.0f} ms round trips"
    )
    header = (
        f"{'Slack profile':<16} {'--rate-profile':<16} {'samples':>7} {'rate/allowed':>12} {'429s':>5} "
        f"{'wall':>7} {'floor':>7} {'wall/floor':>10} {'against Slack':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['slack']:<16} {row['client']:<16} {row['samples']:>7} {row['rate']:>12.3f} "
            f"{row['limited']:>5} {row['wall']:>6.1f}s {row['floor']:>6.1f}s "
            f"{row['wall'] / row['floor']:>10.2f} "
            f"{_duration(row['slack_time']):>13}"
        )
    worst = min(row["rate"] for row in rows)
    print(f"lowest achieved/allowed rate of conversations.replies: {worst:.3f} (goal >= 0.9)")


def kill_and_resume() -> None:
    """A non-Marketplace scrape killed in its second channel, then resumed: what it fetched twice."""
    workspace = small_workspace(time.time(), 3, 40, 1)
    scale = 600.0
    args = ["--rate-profile", "non-marketplace", "--rate-scale", str(scale), "--max-concurrency", "1"]
    args += ["--rescan-days", "0", "--max-samples", "1000", "--json-progress"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "SLACK_BOT_TOKEN": TOKEN, "PYTHONPATH": f"{root / 'operator'}:{root}"}
    out = Path(tempfile.mkdtemp(prefix="bench-scrape-resume-"))
    argv = [sys.executable, "-m", "doppel.cli", "scrape", "--user", "user0", "--out", str(out), *args]
    with SlackEmulator(rate_scale=scale, latency=LATENCY, rate_profile="non-marketplace") as emulator:
        emulator.add_team(workspace, token=TOKEN)
        env["SLACK_API_URL"] = emulator.base_url
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event["channels_done"] == 1 and event["messages"] >= 120 + 45:
                time.sleep(0.5)  # into the second page's threads (10 calls/s)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        first = len(emulator.calls)
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        calls = emulator.calls
    before, after = calls[:first], calls[first:]

    def fetched(part: list[Any], method: str, *keys: str) -> set[tuple[Any, ...]]:
        return {
            (c.params["channel"], *(c.params.get(k) for k in keys))
            for c in part
            if c.method == method and c.status == 200
        }

    pages = fetched(before, "conversations.history", "oldest", "latest")
    pages &= fetched(after, "conversations.history", "oldest", "latest")
    threads = fetched(before, "conversations.replies", "ts") & fetched(after, "conversations.replies", "ts")
    per_channel = {c: sum(1 for p in pages if p[0] == c) for c in ("C000", "C001", "C002")}
    samples = sum(1 for _ in (out / "samples.jsonl").open())
    print(
        f"\nkill and resume (non-marketplace, 3 channels x 40 threads, killed in the second channel): "
        f"{samples} samples of 120; fetched again: {len(pages)} history page(s) {per_channel}, "
        f"{len(threads)} thread(s) (a page batch is 1 page and at most 15 threads; goal <= 1 batch a "
        "channel)"
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
    person = Person(MARGARET.id, MARGARET.name)
    rates = {}
    for scrub in (False, True):
        options = ScrapeOptions(max_samples=10_000, scrub=scrub)

        def build(options: ScrapeOptions = options) -> None:
            build_samples(threads, person, workspace["users"], names, options, team="T", source="b")

        best = min(_timed(build) for _ in range(rounds))
        rates[scrub] = count / best
        state = "on " if scrub else "off"
        print(f"sample building, scrub {state}: {count / best:,.0f} messages/s ({best:.2f} s)")
    # What the Web API fetch of this workspace takes at Slack's real Tier-3 limit (50/min per method): a
    # history page a channel, a replies call a thread the person replied in.
    replied = {
        m.get("thread_ts")
        for msgs in workspace["messages"].values()
        for m in msgs
        if m.get("user") == MARGARET.id
    }
    calls = len(replied - {None}) + CHANNELS
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
    profiles()
    kill_and_resume()
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
