"""`doppel local` on a "real" workspace (export ZIP or the Slack Web API emulator) and on bad input.

Bad input must end with exit code 2, one line on stderr, and nothing half-written under --workdir.
"""

import json
import re
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.support.slack_emulator import SlackEmulator
from tests.support.slack_fixtures import FAST_RATE_SCALE

from doppel.cli import main
from doppel.demo.workspace import MARGARET, SIGN_OFF, TEAM_ID, build_workspace, write_export

TOKEN = "xoxb-demo-local-0001"
# The demo workspace dates from 2024: reach back far enough for it.
ALL_OF_IT = "100000"


@pytest.fixture
def export(tmp_path):
    return write_export(tmp_path / "workspace.zip")


def local(workdir: Path, *args: str):
    return CliRunner().invoke(main, ["local", *args, "--workdir", str(workdir)])


def assert_bad_input(result, reason: str, *, after_stages: bool = False) -> None:
    """Exit 2 and the reason on one line; checks made before any stage starts leave stderr at that one
    line, later ones follow the progress lines of the stages that ran."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) > 1 if after_stages else len(lines) == 1, result.stderr
    assert all(not line.startswith("doppel:") for line in lines[:-1]), result.stderr
    assert lines[-1].startswith("doppel: error: ") and reason in lines[-1], lines[-1]


def test_unknown_demo_person_writes_nothing(tmp_path):
    workdir = tmp_path / "data"
    result = local(workdir, "--demo", "--user", "nobody")
    assert_bad_input(result, "no user 'nobody'")
    assert not workdir.exists()


def test_missing_export(tmp_path):
    workdir = tmp_path / "data"
    result = local(workdir, "--export", str(tmp_path / "nope.zip"), "--user", "alice", "--base-model", "x")
    assert_bad_input(result, "export not found")
    assert not workdir.exists()


def test_bad_base_model_path(tmp_path, export):
    workdir = tmp_path / "data"
    (tmp_path / "empty-model").mkdir()
    for model in (str(tmp_path / "missing-model"), str(tmp_path / "empty-model")):
        result = local(workdir, "--export", str(export), "--user", "margaret", "--base-model", model)
        assert_bad_input(result, "no model there")
    assert not workdir.exists()


def test_unknown_hub_model_offline(tmp_path, export, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    workdir = tmp_path / "data"
    hub_id = "no-such-org/no-such-model"
    result = local(workdir, "--export", str(export), "--user", "margaret", "--base-model", hub_id)
    assert_bad_input(result, "base model 'no-such-org/no-such-model' cannot be fetched", after_stages=True)
    assert not workdir.exists()


def test_unknown_user_in_export(tmp_path, export, tiny_model):
    workdir = tmp_path / "data"
    result = local(workdir, "--export", str(export), "--user", "nobody", "--base-model", str(tiny_model))
    assert_bad_input(result, "no user 'nobody' in this workspace", after_stages=True)
    assert not (workdir / "data").exists()


def test_not_an_export(tmp_path, tiny_model):
    bogus = tmp_path / "bogus.zip"
    bogus.write_text("not a zip at all")
    workdir = tmp_path / "data"
    result = local(workdir, "--export", str(bogus), "--user", "margaret", "--base-model", str(tiny_model))
    assert_bad_input(result, "not a Slack export ZIP", after_stages=True)
    assert not (workdir / "data").exists()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--demo", "--export", "x.zip"], "give exactly one of --demo, --export ZIP or --slack-token"),
        ([], "give exactly one of --demo, --export ZIP or --slack-token"),
        (["--slack-token", "xoxb-1", "--base-model", "m"], "--user is required"),
        (["--demo", "--max-steps", "0"], "--max-steps must be at least 1"),
        (["--demo", "--cutoff-days", "0"], "--cutoff-days must be positive"),
        (["--demo", "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--demo", "--base-model", "./no-such-model"], "no model there"),
        (["--demo", "--chat", "--socket-mode"], "at most one of --chat and --socket-mode"),
    ],
)
def test_contradictory_options(tmp_path, args, reason):
    workdir = tmp_path / "data"
    assert_bad_input(local(workdir, *args), reason)
    assert not workdir.exists()


def test_old_export_cutoff_counts_back_from_the_persons_newest_message(tmp_path, export, tiny_model):
    """The demo export is from 2024: the cutoff counts back from Margaret's newest message in it, not from
    today, and a cutoff that leaves her nothing says why."""
    workdir = tmp_path / "data"
    args = ("--export", str(export), "--user", "margaret", "--base-model", str(tiny_model))
    result = local(workdir, *args, "--cutoff-days", "0.01")
    assert_bad_input(
        result, "none of Margaret Okafor's 107 messages is after the cutoff 2024-04-04", after_stages=True
    )
    assert "the newest is from 2024-04-04" in result.stderr
    assert not (workdir / "adapters" / "margaret").exists() or not any(
        (workdir / "adapters" / "margaret").iterdir()
    )


def test_a_built_in_model_s_directory_is_that_model(tmp_path, export, smollm2_model):
    """The directory `doppel base-model` prints, given as --base-model, is the built-in SmolLM2 (its CPU
    budget, not hours of the GPU recipe's steps), as its name is."""
    workdir = tmp_path / "data"
    args = ("--export", str(export), "--user", "margaret", "--base-model", str(smollm2_model))
    result = local(workdir, *args, "--cutoff-days", "0.01")  # stops at the scrape, after the base model
    assert_bad_input(result, "is after the cutoff", after_stages=True)
    assert re.search(r"\[2/6\] base model done in [\d.]+s: smollm2-135m$", result.stderr, re.M), result.stderr


@pytest.mark.parametrize("later_messages", [1, 22])
def test_a_person_who_wrote_little_in_their_last_year_is_learnt_from_further_back(
    tmp_path, tiny_model, later_messages
):
    """Margaret writes again two years after the demo workspace's last day: her last 365 days hold one
    message, or 22 of which the held-out share leaves 18 to train on, too few, so `doppel local` (its
    cutoff not chosen) reaches back through the export and says so; a cutoff the user chose is kept
    (test_too_few_samples_says_what_each_filter...)."""
    files = build_workspace()
    newest = max(float(m["ts"]) for name, day in files.items() if "/" in name for m in day)
    for i in range(later_messages):  # an hour apart: each its own conversation, each a sample of its own
        later = newest + 2 * 365 * 86400 + i * 3600
        text = (
            f"Coming back to this after two years away ({i}): the board wants the quarterly roadmap by "
            "Friday, so please send me your estimates before Thursday."
        )
        name = f"general/{datetime.fromtimestamp(later, UTC):%Y-%m-%d}.json"
        files.setdefault(name, []).append(
            {"type": "message", "user": MARGARET.id, "text": text, "ts": f"{later:.6f}"}
        )
    export = tmp_path / "left.zip"
    with zipfile.ZipFile(export, "w") as archive:
        for path, content in files.items():
            archive.writestr(path, json.dumps(content))
    workdir, result_file = tmp_path / "data", tmp_path / "result.json"
    args = ["local", "--export", str(export), "--user", "margaret", "--base-model", str(tiny_model)]
    args += ["--max-steps", "1", "--max-tokens", "16", "--workdir", str(workdir)]
    result = CliRunner(env={"DOPPEL_RESULT_FILE": str(result_file)}).invoke(main, args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert re.search(
        r"scrape done in [\d.]+s: (\d+) samples of Margaret Okafor \(\1 new\), "
        r"--min-length 100 \(from their median message length\), since 2024-0\d-\d\d: "
        r"their last 365 days held too few",
        result.stderr,
    ), result.stderr
    assert json.loads(result_file.read_text())["samples"] > 20
    # The next run keeps reaching back (the same samples, colleagues and memory): the adapter is reused.
    again = CliRunner(env={"DOPPEL_RESULT_FILE": str(result_file)}).invoke(main, args)
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert "their last 365 days held too few" in again.stderr and "unchanged, reused" in again.stderr


def emulated_demo_workspace() -> dict:
    """The demo export as the Slack emulator serves it."""
    files = build_workspace()
    messages: dict[str, list] = {}
    for name, content in files.items():
        if "/" in name:
            messages.setdefault(name.split("/")[0], []).extend(content)
    return {
        "team": {"id": TEAM_ID, "name": "Demo"},
        "users": files["users.json"],
        "channels": files["channels.json"],
        "messages": messages,
    }


def test_too_few_samples_says_what_each_filter_removed(tmp_path, export, tiny_model):
    workdir = tmp_path / "data"
    args = (
        "--export",
        str(export),
        "--user",
        "margaret",
        "--base-model",
        str(tiny_model),
        "--cutoff-days",
        "9999",
    )
    result = local(workdir, *args, "--min-length", "232")
    assert_bad_input(result, "20 needed", after_stages=True)
    reason = result.stderr.strip().splitlines()[-1]
    assert re.search(r"not enough data: \d+ samples of Margaret Okafor", reason), reason
    assert re.search(r"\d+ shorter than --min-length 232", reason), reason
    assert not (workdir / "adapters").exists()


def test_through_the_slack_api_then_incrementally(tmp_path, tiny_model):
    workdir = tmp_path / "data"
    result_file = tmp_path / "result.json"
    with SlackEmulator(rate_scale=FAST_RATE_SCALE) as emulator:
        team = emulator.add_team(emulated_demo_workspace(), token=TOKEN)
        args = [
            "--slack-token", TOKEN, "--slack-api-url", emulator.base_url,
            "--slack-rate-scale", str(FAST_RATE_SCALE), "--user", "margaret",
            "--base-model", str(tiny_model), "--max-steps", "1", "--max-tokens", "16",
            "--cutoff-days", ALL_OF_IT,
            "--workdir", str(workdir),
        ]  # fmt: skip
        first = CliRunner(env={"DOPPEL_RESULT_FILE": str(result_file)}).invoke(main, ["local", *args])
        assert first.exit_code == 0, (first.stderr, first.exception)
        summary = json.loads(result_file.read_text())
        assert emulator.calls_to("conversations.history") and emulator.calls_to("conversations.replies")
        assert summary["samples"] > 20 and summary["trained"] is True and summary["steps"] == 1
        assert "held-out loss on unseen threads" in first.stdout
        # The replies stage asks the workspace's own held-out messages, beside what Margaret replied.
        assert first.stdout.count("real reply of Margaret Okafor: ") == 3
        old_adapter = Path(summary["adapter"])
        # They are the fidelity report's own examples, not generated a second time.
        examples = json.loads((old_adapter / "eval.json").read_text())["examples"][:3]
        shown = " ".join(first.stdout.split())
        for example in examples:
            assert " ".join(example["real"].split()[:3]) in shown
            assert " ".join(example["context"].splitlines()[-1].split()[:3]) in shown

        # Margaret says something new: the next run fetches only that, and trains a new adapter.
        general = next(c for c in team.channels.values() if c["name"] == "general")
        newest = max(float(m["ts"]) for m in team.messages[general["id"]])
        text = (
            "Thank you all for a productive quarter. I would recommend that we document the lessons "
            f"from the billing migration before the holidays.\n{SIGN_OFF}"
        )
        emulator.add_message(
            general["id"], {"type": "message", "user": MARGARET.id, "text": text, "ts": f"{newest + 60:.6f}"}
        )
        history_calls = len(emulator.calls_to("conversations.history"))
        # Forced past the fidelity gate (test_local_gate.py): one step each, either adapter may measure a
        # little better on the held-out replies.
        second = CliRunner(env={"DOPPEL_RESULT_FILE": str(result_file)}).invoke(
            main, ["local", *args, "--force-promotion"]
        )
        assert second.exit_code == 0, (second.stderr, second.exception)
        again = json.loads(result_file.read_text())
        assert again["added_samples"] == 1 and again["samples"] == summary["samples"] + 1
        assert again["trained"] is True and again["adapter"] != summary["adapter"]
        # Incremental: each channel's history is asked only from the last message seen (2024), not
        # from the cutoff (decades back).
        later = emulator.calls_to("conversations.history")[history_calls:]
        assert later and all(float(call.params["oldest"]) > 1.7e9 for call in later)
    assert not old_adapter.exists()
    assert Path(again["adapter"]).is_dir()


def test_wrong_slack_token_writes_nothing(tmp_path, tiny_model):
    workdir = tmp_path / "data"
    with SlackEmulator(rate_scale=FAST_RATE_SCALE) as emulator:
        emulator.add_team(emulated_demo_workspace(), token=TOKEN)
        result = local(
            workdir, "--slack-token", "xoxb-wrong", "--slack-api-url", emulator.base_url,
            "--user", "margaret", "--base-model", str(tiny_model),
        )  # fmt: skip
    assert_bad_input(result, "Slack rejected the token (invalid_auth)", after_stages=True)
    assert "xoxb-wrong" not in result.stderr
    assert not (workdir / "data").exists()


def test_a_workdir_that_is_a_file_is_bad_input_and_left_alone(tmp_path):
    workdir = tmp_path / "data"
    workdir.write_text("someone's notes")
    assert_bad_input(local(workdir, "--demo", "--base-model", "doppel-tiny"), "is not a directory")
    assert workdir.read_text() == "someone's notes"
