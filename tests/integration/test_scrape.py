"""`doppel scrape` against the Slack Web API emulator and from an export ZIP, driven as a user would."""

import json
import subprocess
import sys
import time
import zipfile

import pytest
from click.testing import CliRunner
from tests.support.slack_fixtures import ACME_TOKEN, assert_bad_input, write_export_zip

from doppel.cli import main
from doppel.slack.samples import ScrapeOptions
from doppel.slack.scrape import ApiSettings, scrape_api
from doppel.slack.webapi import SlackUnavailable


def scrape(emulator, out, *args, token=ACME_TOKEN, env=None):
    argv = ["scrape", "--user", "alice", "--out", str(out), "--rate-scale", "1000", *args]
    full_env = {
        "SLACK_BOT_TOKEN": token,
        "SLACK_API_URL": emulator.base_url if emulator else "",
        **(env or {}),
    }
    return CliRunner().invoke(main, argv, env=full_env)


def read_samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def replies(out):
    return [s["messages"][-1]["content"].split("\n")[-1] for s in read_samples(out)]


def test_scrape_through_the_api(slack_emulator, tmp_path, monkeypatch):
    result_file = tmp_path / "result.json"
    out = tmp_path / "out"
    result = scrape(slack_emulator, out, env={"DOPPEL_RESULT_FILE": str(result_file)})
    assert result.exit_code == 0, result.output
    samples = read_samples(out)
    assert len(samples) == 8
    assert {s["meta"]["channel"] for s in samples} == {"general", "engineering", "design"}
    texts = "\n".join(replies(out))
    assert "job 42 (https://ci.example.com/jobs/42) & the notes in https://wiki.example.com/deploy" in texts
    assert "@doppel is going to learn" in texts
    assert "archived" not in texts and "Private channel" not in texts and "Shared with another" not in texts
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 8 and manifest["person"]["id"] == "U01ALICE"
    assert manifest["dropped"] == {"too_short": 2}
    assert manifest["channels"]["general"]["samples"] == 4
    assert manifest["options"]["max_samples"] == 2000  # the newest 2,000 kept unless told otherwise
    summary = json.loads(result_file.read_text())
    assert summary["ok"] is True and summary["samples"] == 8
    assert summary["channels"] == ["design", "engineering", "general"]
    # It joined the public channels it was not in, and only those.
    joined = [c.params["channel"] for c in slack_emulator.calls_to("conversations.join")]
    assert sorted(joined) == ["C02ENG", "C06DESIGN"]
    assert all(c.status == 200 and c.error is None for c in slack_emulator.calls)


def test_export_gives_the_same_samples_as_the_api(slack_emulator, slack_workspace, tmp_path):
    # Talk in the channel, not in a thread: the answer's context is the question's window.
    now = int(time.time())
    question = "is the staging deploy still at five today, or did it move after the incident review?"
    answer = (
        "Still at five. The review only moved the retro to Friday, "
        "so nothing at all changes for the deploy now."
    )
    short = "Yes, after the retro on Friday."  # under --min-length: remembered, never a sample
    for ts, user, text in (
        (now - 200, "U02BOB", question),
        (now - 140, "U01ALICE", answer),
        (now - 100, "U02BOB", "and the retro itself?"),
        (now - 90, "U01ALICE", short),
    ):
        message = {"type": "message", "ts": f"{ts}.000100", "user": user, "text": text}
        slack_emulator.add_message("C01GENERAL", message)
        slack_workspace["messages"]["general"].append(message)
    # An export counts its cutoff from its newest message and takes archived channels: asked not to here.
    assert scrape(slack_emulator, tmp_path / "api", "--cutoff-days", "3650").exit_code == 0
    zip_path = write_export_zip(slack_workspace, tmp_path / "workspace.zip")
    result = scrape(
        None, tmp_path / "export", "--export", str(zip_path), "--cutoff-days", "3650", "--exclude-archived"
    )
    assert result.exit_code == 0, result.output
    # The export knows nothing of the bot, so its own mention renders through its display name, "doppel".
    assert (tmp_path / "api" / "samples.jsonl").read_bytes() == (
        tmp_path / "export" / "samples.jsonl"
    ).read_bytes()
    (windowed,) = [s for s in read_samples(tmp_path / "api") if s["messages"][-1]["content"] == answer]
    assert windowed["messages"][-2] == {"role": "user", "content": f"bobby: {question}"}
    # The person's memory holds their messages, the short ones too, each with the message it answered.
    memory = (tmp_path / "api" / "memory.jsonl").read_bytes()
    assert memory == (tmp_path / "export" / "memory.jsonl").read_bytes()
    remembered = [json.loads(line) for line in memory.decode().splitlines()]
    assert not any(s["messages"][-1]["content"] == short for s in read_samples(tmp_path / "api"))
    (said,) = [m for m in remembered if m["text"] == short]
    assert said["answered"] == "bobby: and the retro itself?" and said["channel"] == "general"
    assert {m["ts"] for m in remembered} >= {s["meta"]["ts"] for s in read_samples(tmp_path / "api")}
    manifest = json.loads((tmp_path / "api" / "manifest.json").read_text())
    assert manifest["memory"] == len(remembered) > manifest["samples"]


def test_channel_lists_and_cutoff(slack_emulator, tmp_path):
    out = tmp_path / "out"
    result = scrape(
        slack_emulator, out, "--channel", "secret-plans", "--channel", "general", "--cutoff-days", "1000"
    )
    assert result.exit_code == 0, result.output
    channels = {s["meta"]["channel"] for s in read_samples(out)}
    assert channels == {"secret-plans", "general"}
    assert any("year older" in r for r in replies(out))
    other = tmp_path / "other"
    assert scrape(slack_emulator, other, "--exclude-channel", "general").exit_code == 0
    assert {s["meta"]["channel"] for s in read_samples(other)} == {"engineering", "design"}


def test_include_private_alone_takes_the_private_channels_the_bot_is_in(slack_emulator, tmp_path):
    """`--include-private` without `--channel`: the private channel the bot was invited to is listed and
    scraped; the shared one still is not."""
    out = tmp_path / "out"
    result = scrape(slack_emulator, out, "--include-private", "--cutoff-days", "1000")
    assert result.exit_code == 0, result.output
    assert "secret-plans" in {s["meta"]["channel"] for s in read_samples(out)}
    assert any(r.startswith("Private channel:") for r in replies(out))
    listed = json.loads((out / "manifest.json").read_text())["channels"]
    assert "skipped" not in listed["secret-plans"] and "skipped" in listed["partners"]
    types = {c.params.get("types") for c in slack_emulator.calls_to("conversations.list")}
    assert types == {"public_channel,private_channel"}
    default = tmp_path / "default"  # not asked for: not even listed (no groups:read scope needed)
    assert scrape(slack_emulator, default, "--cutoff-days", "1000").exit_code == 0
    assert "secret-plans" not in {s["meta"]["channel"] for s in read_samples(default)}


def test_second_run_fetches_only_newer_messages(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    chosen = json.loads((out / "manifest.json").read_text())["options"]["min_length"]
    state = json.loads((out / "state.json").read_text())
    latest = state["channels"]["C02ENG"]["latest"]
    newer = f"{int(float(latest)) + 60}.000100"
    text = "A brand new message after the first scrape, long enough to be a sample: " + "x" * 40
    slack_emulator.add_message("C02ENG", {"type": "message", "ts": newer, "user": "U01ALICE", "text": text})
    for seconds, short in ((70, "ok, merged it a minute ago"), (80, "will look at the logs later")):
        ts = f"{int(float(latest)) + seconds}.000100"
        slack_emulator.add_message("C02ENG", {"type": "message", "ts": ts, "user": "U01ALICE", "text": short})
    start = len(slack_emulator.calls)
    result = scrape(slack_emulator, out, "--rescan-days", "0")
    assert result.exit_code == 0, result.output
    history = [c for c in slack_emulator.calls[start:] if c.method == "conversations.history"]
    assert {c.params["channel"]: c.params["oldest"] for c in history}["C02ENG"] == latest
    assert [c for c in slack_emulator.calls[start:] if c.method == "conversations.replies"] == []
    samples = read_samples(out)
    assert len(samples) == 9 and [s["meta"]["ts"] for s in samples].count(newer) == 1
    assert len({(s["meta"]["channel_id"], s["meta"]["ts"]) for s in samples}) == 9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["added"] == 1
    # The length the first run chose (alice's median) holds, not the median of this run's new messages,
    # which would have made the two short ones samples.
    assert manifest["options"]["min_length"] == chosen and not manifest["options"]["min_length_given"]
    remembered = [json.loads(line)["ts"] for line in (out / "memory.jsonl").read_text().splitlines()]
    assert remembered.count(newer) == 1 and len(remembered) == len(set(remembered))


LATE_REPLY = "Coming back to this a few days later: the rollback plan worked, and " + "y" * 60


def add_late_reply(emulator, channel, root, seconds_ago=60):
    """Alice's reply, posted `seconds_ago`, to the thread `root`; its ts."""
    ts = f"{int(time.time()) - seconds_ago}.000900"
    text = f"{LATE_REPLY} ({seconds_ago})"
    emulator.add_message(
        channel, {"type": "message", "ts": ts, "thread_ts": root, "user": "U01ALICE", "text": text}
    )
    return ts


def calls_since(emulator, start, method):
    return [c.params for c in emulator.calls[start:] if c.method == method]


def test_late_reply_to_an_older_thread_is_picked_up(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    state = json.loads((out / "state.json").read_text())
    threads = {cid: c["threads"] for cid, c in state["channels"].items()}
    assert {cid: len(t) for cid, t in threads.items()} == {"C01GENERAL": 2, "C02ENG": 1, "C06DESIGN": 1}
    root = next(iter(threads["C02ENG"]))
    assert float(root) < float(state["channels"]["C02ENG"]["latest"])  # older than the saved point
    before = {s["meta"]["ts"] for s in read_samples(out)}
    late = add_late_reply(slack_emulator, "C02ENG", root, seconds_ago=120)

    start = len(slack_emulator.calls)
    result = scrape(slack_emulator, out)
    assert result.exit_code == 0, result.output
    samples = read_samples(out)
    assert {s["meta"]["ts"] for s in samples} - before == {late}
    assert len(samples) == len(before) + 1 == len({s["meta"]["ts"] for s in samples})
    new = next(s for s in samples if s["meta"]["ts"] == late)
    assert new["meta"]["thread_ts"] == root and LATE_REPLY in new["messages"][-1]["content"]
    # Its context is the whole thread, not only what came after the recorded latest reply.
    context = "\n".join(m["content"] for m in new["messages"][1:])
    assert "bobby: Should we move the build to the new runners?" in context and "Carol Diaz:" in context
    assert json.loads((out / "manifest.json").read_text())["added"] == 1
    # Bounded: the threads all started within the 14-day window, so one history call per channel lists
    # their parents (with latest_reply) and only the changed thread is fetched.
    history = calls_since(slack_emulator, start, "conversations.history")
    assert sorted(c["channel"] for c in history) == ["C01GENERAL", "C02ENG", "C06DESIGN"]
    assert all(float(c["oldest"]) < float(root) for c in history)
    replies = calls_since(slack_emulator, start, "conversations.replies")
    assert [(c["channel"], c["ts"], "oldest" in c) for c in replies] == [("C02ENG", root, False)]
    assert json.loads((out / "state.json").read_text())["channels"]["C02ENG"]["threads"][root] == late

    # With a 3-day window the thread's root is outside what history lists again, but its recorded
    # activity is inside: one conversations.replies call from that reply finds the next late one.
    later = add_late_reply(slack_emulator, "C02ENG", root, seconds_ago=60)
    start = len(slack_emulator.calls)
    result = scrape(slack_emulator, out, "--rescan-days", "3")
    assert result.exit_code == 0, result.output
    assert {s["meta"]["ts"] for s in read_samples(out)} - before == {late, later}
    history = calls_since(slack_emulator, start, "conversations.history")
    assert all(c["oldest"] == state["channels"][c["channel"]]["latest"] for c in history)
    replies = calls_since(slack_emulator, start, "conversations.replies")
    assert [(c["channel"], c["ts"], c.get("oldest")) for c in replies] == [
        ("C02ENG", root, late),
        ("C02ENG", root, None),
    ]

    # Nothing new: no thread is fetched again.
    start = len(slack_emulator.calls)
    assert scrape(slack_emulator, out).exit_code == 0
    assert calls_since(slack_emulator, start, "conversations.replies") == []
    assert json.loads((out / "manifest.json").read_text())["added"] == 0


def test_first_reply_to_a_message_scraped_without_replies(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    state = json.loads((out / "state.json").read_text())
    lone = state["channels"]["C02ENG"]["latest"]  # Alice's short top-level message, no replies then
    assert lone not in state["channels"]["C02ENG"]["threads"]
    late = add_late_reply(slack_emulator, "C02ENG", lone)
    assert scrape(slack_emulator, out).exit_code == 0
    assert late in {s["meta"]["ts"] for s in read_samples(out)}
    assert json.loads((out / "manifest.json").read_text())["added"] == 1


def test_rescan_window_bounds_the_rechecks(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    root = next(iter(json.loads((out / "state.json").read_text())["channels"]["C02ENG"]["threads"]))
    add_late_reply(slack_emulator, "C02ENG", root)
    start = len(slack_emulator.calls)
    # The fixture's threads were last active 5 to 7 days ago: outside a 2-day window, never re-checked.
    for args in (["--rescan-days", "2"], ["--rescan-days", "0"]):
        result = scrape(slack_emulator, out, *args)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["added"] == 0
    assert calls_since(slack_emulator, start, "conversations.replies") == []
    result = scrape(slack_emulator, out, "--rescan-days", "30")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["added"] == 1


def test_a_deleted_thread_root_leaves_a_readable_tombstone(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    root = next(iter(json.loads((out / "state.json").read_text())["channels"]["C02ENG"]["threads"]))
    # Bob deletes his question: Slack keeps a tombstone root, and the replies (Alice's among them) stay.
    slack_emulator.delete_message("C02ENG", root)
    late = add_late_reply(slack_emulator, "C02ENG", root)
    result = scrape(slack_emulator, out)
    assert result.exit_code == 0, result.output
    new = next(s for s in read_samples(out) if s["meta"]["ts"] == late)
    context = "\n".join(m["content"] for m in new["messages"][1:])
    assert "Should we move the build" not in context and "This message was deleted" not in context
    assert "Carol Diaz:" in context
    assert json.loads((out / "state.json").read_text())["channels"]["C02ENG"]["threads"][root] == late


def test_a_deleted_thread_is_forgotten(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    threads = json.loads((out / "state.json").read_text())["channels"]["C02ENG"]["threads"]
    root = next(iter(threads))
    add_late_reply(slack_emulator, "C02ENG", root)
    assert scrape(slack_emulator, out).exit_code == 0
    # Every message of it deleted while outside the listed window: conversations.replies says
    # thread_not_found.
    thread = [m["ts"] for m in slack_emulator.team.messages["C02ENG"] if m.get("thread_ts") == root]
    for ts in sorted({*thread, root}, key=float, reverse=True):
        slack_emulator.delete_message("C02ENG", ts)
    result = scrape(slack_emulator, out, "--rescan-days", "3")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "state.json").read_text())["channels"]["C02ENG"]["threads"] == {}
    # Deleted within it: history no longer lists it.
    general = json.loads((out / "state.json").read_text())["channels"]["C01GENERAL"]["threads"]
    oldest = min(general, key=float)
    thread = [m["ts"] for m in slack_emulator.team.messages["C01GENERAL"] if m.get("thread_ts") == oldest]
    for ts in sorted({*thread, oldest}, key=float, reverse=True):
        slack_emulator.delete_message("C01GENERAL", ts)
    result = scrape(slack_emulator, out)
    assert result.exit_code == 0, result.output
    left = json.loads((out / "state.json").read_text())["channels"]["C01GENERAL"]["threads"]
    assert list(left) == [max(general, key=float)]
    assert len(read_samples(out)) == 9  # the samples already taken stay


def test_a_burst_of_5xx_is_retried(slack_emulator, tmp_path):
    slack_emulator.fail("conversations.history", 2, status=503)
    slack_emulator.fail("users.list", 1, status=500)
    result = scrape(slack_emulator, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(read_samples(tmp_path / "out")) == 8


def test_5xx_storm_is_transient_not_bad_input(slack_emulator, tmp_path):
    # Through the Python API `doppel local` uses, with short backoffs so the test stays fast.
    slack_emulator.fail("conversations.replies", 100, status=503)
    out = tmp_path / "out"
    settings = ApiSettings(base_url=slack_emulator.base_url, rate_scale=1000, retry_backoff=0.01)
    with pytest.raises(SlackUnavailable, match=r"HTTP 503 on conversations\.replies\) after 3 retries"):
        scrape_api(ACME_TOKEN, "alice", out, ScrapeOptions(), settings)
    assert not out.exists() or not any(out.iterdir())
    assert len([c for c in slack_emulator.calls if c.status == 503]) <= 4 * 4  # 4 tries, 4 channels at most


def test_unreachable_slack_is_transient_not_bad_input(tmp_path):
    out = tmp_path / "out"
    settings = ApiSettings(base_url="http://127.0.0.1:9/api/", retry_backoff=0.01)
    with pytest.raises(SlackUnavailable, match=r"cannot reach Slack at http://127\.0\.0\.1:9/api/"):
        scrape_api(ACME_TOKEN, "alice", out, ScrapeOptions(), settings)
    assert not out.exists()


def test_token_of_another_team(slack_emulator, tmp_path):
    out = tmp_path / "out"
    result = scrape(slack_emulator, out, "--team", "T0OTHER")
    assert_bad_input(result, out, "belongs to team T0ACME001, not T0OTHER")


def test_invalid_token(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert_bad_input(scrape(slack_emulator, out, token="xoxb-nope"), out, "invalid_auth")
    assert_bad_input(scrape(slack_emulator, out, token=""), out, "SLACK_BOT_TOKEN")


def test_channel_vanishing_mid_scrape(slack_emulator, tmp_path):
    slack_emulator.vanish_channel("C01GENERAL", after_calls=1)  # history answers, then its threads are gone
    out = tmp_path / "out"
    result = scrape(slack_emulator, out)
    assert result.exit_code == 0, result.output
    assert "skipped channel #general: the channel is gone (channel_not_found)" in result.stderr
    assert {s["meta"]["channel"] for s in read_samples(out)} == {"engineering", "design"}
    assert "C01GENERAL" not in json.loads((out / "state.json").read_text())["channels"]


@pytest.mark.parametrize(
    ("user", "needles"),
    [("sam", ["ambiguous", "U05SAML", "U06SAMP"]), ("nobody", ["no user 'nobody'"])],
)
def test_unknown_or_ambiguous_user(slack_emulator, tmp_path, user, needles):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["scrape", "--user", user, "--out", str(out), "--rate-scale", "1000"],
        env={"SLACK_BOT_TOKEN": ACME_TOKEN, "SLACK_API_URL": slack_emulator.base_url},
    )
    assert_bad_input(result, out, *needles)


def test_unknown_channel(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert_bad_input(scrape(slack_emulator, out, "--channel", "nope"), out, "unknown channel", "nope")


def test_bad_export_zips(slack_workspace, tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "notes.zip"
    text.write_text("this is not a zip")
    assert_bad_input(scrape(None, out, "--export", str(text)), out, "not a Slack export ZIP")
    assert_bad_input(scrape(None, out, "--export", str(tmp_path / "missing.zip")), out, "no such file")
    no_users = tmp_path / "no_users.zip"
    with zipfile.ZipFile(no_users, "w") as archive:
        archive.writestr("channels.json", "[]")
    assert_bad_input(scrape(None, out, "--export", str(no_users)), out, "no users.json")
    good = write_export_zip(slack_workspace, tmp_path / "good.zip")
    corrupt = tmp_path / "corrupt.zip"
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\0" * 64
    corrupt.write_bytes(bytes(data))
    assert_bad_input(scrape(None, out, "--export", str(corrupt)), out, str(corrupt))
    bad_json = tmp_path / "bad_json.zip"
    with zipfile.ZipFile(bad_json, "w") as archive:
        archive.writestr("users.json", "{not json")
        archive.writestr("channels.json", "[]")
    assert_bad_input(scrape(None, out, "--export", str(bad_json)), out, "users.json is not valid JSON")


def test_bad_input_keeps_earlier_output(slack_emulator, tmp_path):
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    before = (out / "samples.jsonl").read_bytes()
    slack_emulator.fail_with("conversations.history", "token_revoked")
    result = scrape(slack_emulator, out)
    assert result.exit_code == 2 and "token_revoked" in result.stderr
    assert (out / "samples.jsonl").read_bytes() == before
    bob = CliRunner().invoke(
        main,
        ["scrape", "--user", "bob", "--out", str(out), "--rate-scale", "1000"],
        env={"SLACK_BOT_TOKEN": ACME_TOKEN, "SLACK_API_URL": slack_emulator.base_url},
    )
    assert bob.exit_code == 2 and "use another --state" in bob.stderr
    assert (out / "samples.jsonl").read_bytes() == before


def test_corrupt_state_file(slack_emulator, tmp_path):
    out = tmp_path / "out"
    state = tmp_path / "state.json"
    state.write_text("{half a state")
    assert_bad_input(scrape(slack_emulator, out, "--state", str(state)), out, "not a scrape state file")
    assert state.read_text() == "{half a state"
    malformed = {
        "version": 1,
        "team": "T0ACME001",
        "person": "U01ALICE",
        "channels": {"C02ENG": {"name": "engineering", "latest": "1.0", "threads": ["1.0"]}},
    }
    state.write_text(json.dumps(malformed))
    assert_bad_input(scrape(slack_emulator, out, "--state", str(state)), out, "malformed channels")
    assert json.loads(state.read_text()) == malformed


def test_negative_rescan_days(slack_emulator, tmp_path):
    out = tmp_path / "out"
    result = scrape(slack_emulator, out, "--rescan-days", "-1")
    assert result.exit_code == 2 and "--rescan-days" in result.stderr
    assert not out.exists()


def test_the_installed_command_exits_2_with_one_line(slack_emulator, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "doppel.cli", "scrape", "--user", "alice", "--out", str(out)],
        env={
            "SLACK_BOT_TOKEN": "xoxb-wrong",
            "SLACK_API_URL": slack_emulator.base_url,
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == "doppel: error: Slack rejected the token (invalid_auth)\n"
    assert not out.exists() or not any(out.iterdir())


def test_export_dms_only_when_asked_for(slack_workspace, tmp_path):
    zip_path = write_export_zip(slack_workspace, tmp_path / "workspace.zip")
    ts = f"{int(time.time()) - 3600}.000100"
    text = (
        "Between us: I would rather we pushed the launch a week, the onboarding flow is not ready yet at all."
    )
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr("dms.json", json.dumps([{"id": "D0ALICEBOB", "members": ["U01ALICE", "U02BOB"]}]))
        day = time.strftime("%Y-%m-%d", time.gmtime(float(ts)))
        dm = [{"type": "message", "ts": ts, "user": "U01ALICE", "text": text}]
        archive.writestr(f"D0ALICEBOB/{day}.json", json.dumps(dm))
    assert scrape(None, tmp_path / "default", "--export", str(zip_path)).exit_code == 0
    assert text not in replies(tmp_path / "default")
    listed = json.loads((tmp_path / "default" / "manifest.json").read_text())["channels"]
    assert listed["dm-alice-bob"]["skipped"] == "direct messages (--include-dms takes them)"
    result = scrape(None, tmp_path / "dms", "--export", str(zip_path), "--include-dms")
    assert result.exit_code == 0, result.output
    assert text in replies(tmp_path / "dms")


def test_a_later_run_keeps_the_window_across_the_runs(slack_emulator, tmp_path):
    """A channel answer posted after the first run still gets the question asked before it."""
    now = int(time.time())
    question = "did anyone look at the flaky checkout test yet, or should I open a ticket for it today?"
    slack_emulator.add_message(
        "C01GENERAL", {"type": "message", "ts": f"{now - 120}.000100", "user": "U02BOB", "text": question}
    )
    out = tmp_path / "out"
    assert scrape(slack_emulator, out).exit_code == 0
    answer = "I looked this morning: it is the payment mock timing out under load, " + (
        "so a ticket is a good idea, thanks!"
    )
    slack_emulator.add_message(
        "C01GENERAL", {"type": "message", "ts": f"{now - 60}.000100", "user": "U01ALICE", "text": answer}
    )
    result = scrape(slack_emulator, out)
    assert result.exit_code == 0, result.output
    (sample,) = [s for s in read_samples(out) if s["messages"][-1]["content"] == answer]
    assert sample["messages"][-2] == {"role": "user", "content": f"bobby: {question}"}


def test_a_person_of_one_liners_is_learnt_from_their_own_length(tmp_path):
    # The demo's Dev writes one-liners (median 14 characters, none of 100): at a fixed 100 there is nothing
    # to learn. By default a person's samples are their messages of at least their median length (20 to 100
    # characters), so Dev is learnt from what Dev writes, and Margaret (median 216) as before.
    from doppel.demo.workspace import write_export

    export = tmp_path / "demo.zip"
    write_export(export)

    def run(user, *args):
        out = tmp_path / f"{user}{len(args)}"
        result = CliRunner().invoke(
            main, ["scrape", "--export", str(export), "--user", user, "--out", str(out), *args]
        )
        return result, out

    fixed, out = run("dev", "--min-length", "100")
    assert fixed.exit_code == 2
    assert "shorter than --min-length 100" in fixed.output and not out.exists()
    chosen, out = run("dev")
    assert chosen.exit_code == 0, chosen.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["min_length"] == 20 and manifest["options"]["min_length_given"] is False
    lengths = sorted(len(r) for r in replies(out))
    assert len(lengths) == manifest["samples"] >= 10 and 20 <= lengths[0] < 40
    assert manifest["dropped"]["too_short"] > 0  # "ok", "on it": not samples
    chosen, out = run("margaret")
    assert json.loads((out / "manifest.json").read_text())["options"]["min_length"] == 100


def test_memory_remembers_the_message_a_reply_names_not_the_latest_one(slack_workspace, tmp_path):
    """Bob asks, Carol talks lunch in between, Alice answers Bob by mention and then by "bob:": each of her
    memory entries answers Bob's question, as her samples do (answered_message), not Carol's lunch."""
    newest = int(max(float(m["ts"]) for msgs in slack_workspace["messages"].values() for m in msgs))
    question = "why did the billing migration fail on staging last night?"
    named = "bob: also the billing migration needs the new flag, I will add it to the runbook"
    nobody = "great, and the taco place takes cards now so no cash needed"
    said = [
        ("U02BOB", question),
        ("U03CAROL", "anyone up for lunch at the taco place today?"),
        ("U01ALICE", "<@U02BOB> the billing migration failed because the index build ran out of disk"),
        ("U03CAROL", "ok lunch at noon then"),
        ("U01ALICE", named),
        ("U03CAROL", "see you all at the taco place"),
        ("U01ALICE", nobody),
    ]
    slack_workspace["messages"]["general"] += [
        {"type": "message", "ts": f"{newest + 30 * i + 30}.000100", "user": user, "text": text}
        for i, (user, text) in enumerate(said)
    ]
    export = write_export_zip(slack_workspace, tmp_path / "export.zip")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["scrape", "--export", str(export), "--user", "alice", "--out", str(out), "--min-length", "20"]
    )
    assert result.exit_code == 0, result.output
    remembered = {
        m["text"]: m["answered"]
        for m in map(json.loads, (out / "memory.jsonl").read_text().splitlines())
        if "taco" in m["text"] or "billing" in m["text"]
    }
    assert remembered == {
        "@bobby the billing migration failed because the index build ran out of disk": f"bobby: {question}",
        named: f"bobby: {question}",
        # Naming nobody: the latest message of someone else, as before.
        nobody: "Carol Diaz: see you all at the taco place",
    }
    # The samples' contexts hold what memory says they answer.
    contexts = {s["messages"][-1]["content"]: json.dumps(s["messages"][1:-1]) for s in read_samples(out)}
    assert all(answered.split(": ", 1)[1] in contexts[text] for text, answered in remembered.items())
