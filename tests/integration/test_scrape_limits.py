"""`doppel scrape` under Slack's real limits: rate profiles, bad channels, workspace-wide errors, kill and
resume. Driven through the CLI (in-process, or as a process that gets killed) against the emulator."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from tests.support.slack_emulator import SlackEmulator
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID
from tests.support.synthetic_slack import synthetic_workspace

from doppel.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scrape(emulator, out, *args, token=ACME_TOKEN, user="alice", scale="1000"):
    argv = ["scrape", "--user", user, "--out", str(out), "--rate-scale", scale, *args]
    env = {"SLACK_BOT_TOKEN": token, "SLACK_API_URL": emulator.base_url}
    return CliRunner().invoke(main, argv, env=env)


def read_samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def accepted_rate(calls):
    """Accepted calls per second, from the first accepted call to the last."""
    times = [c.time for c in calls if c.status == 200]
    return (len(times) - 1) / (times[-1] - times[0])


@pytest.mark.parametrize("profile", ["internal", "non-marketplace"])
def test_non_marketplace_limits_are_learned_or_known(slack_workspace, tmp_path, profile):
    # Slack takes the app for a distributed non-Marketplace one: 1 history or replies call a minute, pages
    # of 15. Time runs 60x fast (a minute is a second). The default profile (internal) starts at Tier 3
    # and learns the rest from the 429s; told the profile, the scrape meets none.
    with SlackEmulator(rate_scale=60, rate_profile="non-marketplace") as emulator:
        emulator.add_team(slack_workspace, token=ACME_TOKEN, bot_user_id=BOT_USER_ID)
        args = [] if profile == "internal" else ["--rate-profile", profile]
        result = scrape(emulator, tmp_path / "out", *args, scale="60")
        assert result.exit_code == 0, result.output
        assert len(read_samples(tmp_path / "out")) == 8
        for method in ("conversations.history", "conversations.replies"):
            calls = emulator.calls_to(method)
            refused = [c for c in calls if c.status == 429]
            assert len(refused) <= (2 if profile == "internal" else 0), [(c.time, c.status) for c in calls]
            for no in refused:
                # Retry-After said about a (compressed) minute: nobody calls that method sooner.
                later = [c.time for c in calls if c.time > no.time]
                assert not later or later[0] - no.time > 0.9
            # Once learned, calls go at the allowance (1/s here): within 10%.
            assert 0.9 <= accepted_rate(calls) <= 1.0
        if profile == "non-marketplace":
            methods = ("conversations.history", "conversations.replies")
            assert {c.params["limit"] for c in emulator.calls if c.method in methods} == {"15"}


def test_bad_channels_are_skipped_with_their_reason(slack_emulator, tmp_path):
    slack_emulator.team.channels["C06DESIGN"]["is_limited_access"] = True
    slack_emulator.vanish_channel("C02ENG", after_calls=2)  # joined, history answered, then gone
    out = tmp_path / "out"
    wanted = ["random", "general", "engineering", "design"]
    result = scrape(slack_emulator, out, *[a for name in wanted for a in ("--channel", name)])
    assert result.exit_code == 0, result.output
    assert {s["meta"]["channel"] for s in read_samples(out)} == {"general"}
    channels = json.loads((out / "manifest.json").read_text())["channels"]
    skipped = {name: channels[name].get("skipped") for name in wanted if name != "general"}
    assert "skipped" not in channels["general"]
    assert skipped == {
        "random": "the channel is archived (is_archived)",
        "engineering": "the channel is gone (channel_not_found)",
        "design": "the channel's access is limited (channel_is_limited_access)",
    }
    for name, reason in skipped.items():
        assert f"doppel: skipped channel #{name}: {reason}" in result.stderr
    assert set(json.loads((out / "state.json").read_text())["channels"]) == {"C01GENERAL"}


@pytest.mark.parametrize("error", ["not_in_channel", "invalid_cursor", "channel_not_found"])
def test_one_channel_failing_mid_run_does_not_sink_the_others(slack_emulator, tmp_path, error):
    # The first thread fetched answers `error` (the bot removed, a stale cursor, the channel gone).
    slack_emulator.fail_with("conversations.replies", error)
    out = tmp_path / "out"
    result = scrape(slack_emulator, out, "--max-concurrency", "1")
    assert result.exit_code == 0, result.output
    channels = json.loads((out / "manifest.json").read_text())["channels"]
    failed = {name for name in ("general", "engineering", "design") if channels[name].get("skipped")}
    assert failed == {"design"}  # the first channel by name
    assert error in channels["design"]["skipped"] and error in result.stderr
    assert {s["meta"]["channel"] for s in read_samples(out)} == {"general", "engineering"}
    # The next run takes the skipped channel in full.
    again = scrape(slack_emulator, out)
    assert again.exit_code == 0, again.output
    assert {s["meta"]["channel"] for s in read_samples(out)} == {"general", "engineering", "design"}
    assert len(read_samples(out)) == 8


def test_the_bot_removed_from_a_channel(slack_emulator, tmp_path):
    slack_emulator.remove_member("C01GENERAL")
    out = tmp_path / "out"
    result = scrape(slack_emulator, out, "--channel", "secret-plans", "--channel", "general")
    assert result.exit_code == 0, result.output
    # A public channel it left is joined again; a private one it was removed from is not listed.
    assert {s["meta"]["channel"] for s in read_samples(out)} == {"secret-plans", "general"}
    slack_emulator.team.channels["C01GENERAL"]["members"].remove(BOT_USER_ID)
    slack_emulator.fail_with("conversations.join", "method_not_supported_for_channel_type")
    result = scrape(slack_emulator, out, "--channel", "general")
    assert (
        result.exit_code == 2
        and "no channel could be scraped (#general: the bot cannot join" in result.stderr
    )


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doppel: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_workspace_wide_problems_stop_the_run(slack_emulator, tmp_path):
    slack_emulator.set_scopes({"channels:read", "users:read", "channels:join"})
    out = tmp_path / "out"
    one_line_error(
        scrape(slack_emulator, out),
        "the token lacks the scope channels:history needed by conversations.history",
        "granted: channels:join,channels:read,users:read",
    )
    # The run stopped at its first refusal; its other channels' calls may still reach the emulator, and
    # one of them would take the error injected next.
    slack_emulator.settle()
    slack_emulator.set_scopes(None)
    slack_emulator.fail_with("conversations.history", "token_revoked")  # revoked mid-run
    one_line_error(scrape(slack_emulator, out), "Slack rejected the token (token_revoked)")
    assert not (out / "samples.jsonl").exists()
    slack_emulator.deactivate()
    one_line_error(scrape(slack_emulator, out), "Slack rejected the token (account_inactive)")
    unknown = scrape(slack_emulator, out, "--rate-profile", "free")
    assert unknown.exit_code == 2 and "--rate-profile" in unknown.stderr


def start_scrape(emulator, out, *args, user="user0"):
    env = {
        "SLACK_BOT_TOKEN": "xoxb-bench",
        "SLACK_API_URL": emulator.base_url,
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "PATH": "/usr/bin:/bin",
    }
    argv = [sys.executable, "-m", "doppel.cli", "scrape", "--user", user, "--out", str(out), *args]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )


def test_a_killed_scrape_resumes_where_it_stopped(tmp_path):
    workspace = synthetic_workspace(time.time(), channels=3, threads=40, replies=1)
    args = ["--rate-profile", "non-marketplace", "--rate-scale", "1500", "--max-concurrency", "1"]
    args += ["--rescan-days", "0", "--max-samples", "1000", "--json-progress"]
    with SlackEmulator(rate_scale=1500, rate_profile="non-marketplace") as emulator:
        emulator.add_team(workspace, token="xoxb-bench")
        whole = tmp_path / "whole"
        proc = start_scrape(emulator, whole, *args)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        start = len(emulator.calls)

        out = tmp_path / "out"
        proc = start_scrape(emulator, out, *args)
        # Killed once the first channel is done (40 parents, 40 threads of 2) and the second is two pages
        # (of 15 parents and their threads) in.
        for line in proc.stdout:
            event = json.loads(line)
            if event["channels_done"] == 1 and event["messages"] >= 120 + 2 * 45:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        first = emulator.calls[start:]
        state = json.loads((out / "state.json").read_text())["channels"]
        assert "partial" not in state["C000"] and state["C001"]["partial"]["below"]
        assert {s["meta"]["channel"] for s in read_samples(out)} == {"channel-00"}  # kept

        proc = start_scrape(emulator, out, *args)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        second = emulator.calls[start + len(first) :]
    assert read_samples(out) == read_samples(whole)
    assert all("partial" not in c for c in json.loads((out / "state.json").read_text())["channels"].values())
    assert json.loads((out / "manifest.json").read_text())["added"] == 80

    def fetched(calls, method, *keys):
        ok = [c for c in calls if c.method == method and c.status == 200]
        return {(c.params["channel"], *(c.params.get(k) for k in keys)) for c in ok}

    # Fetched again: at most the page of history it was on, and that page's threads (15 at most).
    history = ("conversations.history", "oldest", "latest")
    again = fetched(first, *history) & fetched(second, *history)
    assert len(again) <= 1 and {channel for channel, *_ in again} <= {"C001"}
    threads = fetched(first, "conversations.replies", "ts") & fetched(second, "conversations.replies", "ts")
    assert len(threads) <= 15


def test_concurrent_scrapes_of_one_workspace_share_the_budget(tmp_path):
    # Two Jobs of the same workspace (two people) at once, their budget in one file on the shared volume:
    # together they keep to Slack's allowance instead of each taking all of it.
    workspace = synthetic_workspace(time.time(), channels=2, threads=30, replies=2)
    budget = tmp_path / "budget"
    args = ["--rate-scale", "30", "--rescan-days", "0", "--budget-dir", str(budget)]
    with SlackEmulator(rate_scale=30, burst_seconds=0.2) as emulator:
        emulator.add_team(workspace, token="xoxb-bench")
        procs = [start_scrape(emulator, tmp_path / who, *args, user=who) for who in ("user0", "user2")]
        for proc in procs:
            assert proc.wait(timeout=120) == 0, proc.stderr.read()
        replies = emulator.calls_to("conversations.replies")
    assert len(replies) >= 2 * 60
    assert len([c for c in replies if c.status == 429]) <= 3
    # Tier 3 at 30x: 25 calls/s between them (each learning alone from its own calls crawls at a fifth).
    assert accepted_rate(replies) >= 0.8 * emulator.allowed_per_minute("conversations.replies") / 60
    assert json.loads((budget / "TBENCH.json").read_text())["conversations.replies"]["last_ok"] > 0
    for who in ("user0", "user2"):
        assert len(read_samples(tmp_path / who)) == 60


def test_only_threads_the_person_replied_in_are_fetched(slack_emulator, tmp_path):
    # Slack lists with each parent who replied (reply_users): a thread without the person holds no sample.
    out = tmp_path / "carol"
    result = scrape(slack_emulator, out, "--min-length", "10", user="U03CAROL")
    assert result.exit_code == 0, result.output
    messages = slack_emulator.team.messages
    with_carol = {
        (cid, m["thread_ts"])
        for cid, msgs in messages.items()
        for m in msgs
        if m.get("user") == "U03CAROL"
        if m.get("thread_ts") and m["thread_ts"] != m["ts"]
    }
    fetched = {
        (c.params["channel"], c.params["ts"]) for c in slack_emulator.calls_to("conversations.replies")
    }
    assert fetched == with_carol and len(fetched) == 2
    # A later reply of hers to a thread she was not in is a change: that thread is fetched then.
    start = len(slack_emulator.calls)
    general = json.loads((out / "state.json").read_text())["channels"]["C01GENERAL"]["threads"]
    alone = next(root for root in general if ("C01GENERAL", root) not in with_carol)
    ts = f"{int(time.time()) - 30}.000700"
    text = "Carol here, late to this thread but with a long enough answer to be a sample of mine."
    slack_emulator.add_message(
        "C01GENERAL", {"type": "message", "ts": ts, "thread_ts": alone, "user": "U03CAROL", "text": text}
    )
    result = scrape(slack_emulator, out, "--min-length", "10", user="U03CAROL")
    assert result.exit_code == 0, result.output
    again = [
        (c.params["channel"], c.params["ts"]) for c in slack_emulator.calls[start:] if "replies" in c.method
    ]
    assert again == [("C01GENERAL", alone)]
    assert ts in {s["meta"]["ts"] for s in read_samples(out)}
