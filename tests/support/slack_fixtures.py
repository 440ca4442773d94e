"""Pytest fixtures: Slack Web API emulator fixtures (ingestion).

- `slack_workspace`: the hand-written workspace of tests/fixtures/slack/workspace.json (export shape), its
  timestamps moved so that its newest message is a day old (the default 365-day cutoff stays meaningful);
- `slack_emulator`: a started `SlackEmulator` serving that workspace as team `T0ACME001` with bot token
  `ACME_TOKEN` and bot user `U0DOPPEL`, rate limits scaled up for speed; stopped after the test.
  Add more teams with `slack_emulator.add_team(workspace, token=...)`.
- `write_export_zip(workspace, path)`: the same workspace as a standard Slack export ZIP;
- `assert_bad_input(result, out, *needles)`: a `doppel scrape` refused in one line holding `needles`, exit 2,
  with no samples or manifest written to `out`.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.slack_emulator import SlackEmulator

WORKSPACE_FILE = Path(__file__).resolve().parent.parent / "fixtures" / "slack" / "workspace.json"
ACME_TOKEN = "xoxb-acme-0001-test"
BOT_USER_ID = "U0DOPPEL"
# Fast enough that tests never wait on the limits, unless they lower it.
FAST_RATE_SCALE = 1000.0
_TS_FIELDS = ("ts", "thread_ts", "latest_reply")


def load_workspace(path: Path = WORKSPACE_FILE, now: float | None = None) -> dict[str, Any]:
    """The workspace at `path`, every timestamp shifted by whole seconds so the newest is a day old."""
    workspace = json.loads(Path(path).read_text(encoding="utf-8"))
    now = now if now is not None else dt.datetime.now(dt.UTC).timestamp()
    newest = max(int(m["ts"].split(".")[0]) for msgs in workspace["messages"].values() for m in msgs)
    shift = int(now) - 86400 - newest
    for messages in workspace["messages"].values():
        for message in messages:
            for key in _TS_FIELDS:
                if key in message:
                    message[key] = _shift(message[key], shift)
            if "root" in message:
                message["root"]["ts"] = _shift(message["root"]["ts"], shift)
    return workspace


def _shift(ts: str, seconds: int) -> str:
    whole, _, micros = ts.partition(".")
    return f"{int(whole) + seconds}.{micros or '000000'}"


def write_export_zip(workspace: dict[str, Any], path: Path) -> Path:
    """`workspace` as Slack exports it: users.json, channels.json, groups.json, channel/YYYY-MM-DD.json."""
    public = [c for c in workspace["channels"] if not c.get("is_private")]
    private = [c for c in workspace["channels"] if c.get("is_private")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("users.json", json.dumps(workspace["users"], indent=1))
        archive.writestr("channels.json", json.dumps(public, indent=1))
        archive.writestr("groups.json", json.dumps(private, indent=1))
        for name, messages in workspace["messages"].items():
            days: dict[str, list[dict[str, Any]]] = {}
            for message in sorted(messages, key=lambda m: float(m["ts"])):
                day = dt.datetime.fromtimestamp(float(message["ts"]), dt.UTC).date().isoformat()
                days.setdefault(day, []).append(copy.deepcopy(message))
            for day, content in days.items():
                archive.writestr(f"{name}/{day}.json", json.dumps(content, indent=1))
    return path


def assert_bad_input(result: Any, out: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doppel: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert not (out / "samples.jsonl").exists()
    assert not (out / "manifest.json").exists()


@pytest.fixture
def slack_workspace() -> dict[str, Any]:
    return load_workspace()


@pytest.fixture
def slack_emulator(slack_workspace: dict[str, Any]) -> Iterator[SlackEmulator]:
    emulator = SlackEmulator(rate_scale=FAST_RATE_SCALE)
    emulator.add_team(slack_workspace, token=ACME_TOKEN, bot_user_id=BOT_USER_ID)
    with emulator:
        yield emulator
