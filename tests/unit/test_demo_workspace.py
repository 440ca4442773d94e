"""The synthetic demo workspace: a deterministic, well-formed Slack export with distinct styles."""

import datetime as dt
import json
import re
import subprocess
import sys
import zipfile
from collections import Counter

import pytest

from doppel.demo.workspace import DEMO_PERSON, PEOPLE, SIGN_OFF, demo_questions, export_bytes, write_export

DAY_FILE = re.compile(r"^([a-z-]+)/(\d{4}-\d{2}-\d{2})\.json$")


def read_export(path):
    with zipfile.ZipFile(path) as archive:
        return {name: json.loads(archive.read(name)) for name in archive.namelist()}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return read_export(write_export(tmp_path_factory.mktemp("demo") / "workspace.zip"))


def messages_by_user(export):
    users = {u["id"]: u["name"] for u in export["users.json"]}
    out: dict[str, list[str]] = {name: [] for name in users.values()}
    for name, content in export.items():
        if DAY_FILE.match(name):
            for message in content:
                if "subtype" not in message:
                    out[users[message["user"]]].append(message["text"])
    return out


def test_same_seed_same_bytes_other_seed_other_content():
    assert export_bytes() == export_bytes()
    assert export_bytes(seed=1) != export_bytes(seed=2)


def test_script_writes_the_export_and_rejects_bad_usage(tmp_path):
    out = tmp_path / "ws.zip"
    done = subprocess.run(
        [sys.executable, "-m", "doppel.demo.workspace", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == export_bytes()

    bad = subprocess.run(
        [sys.executable, "-m", "doppel.demo.workspace", str(tmp_path / "ws.txt")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("usage:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws.zip"]


def test_export_has_the_standard_slack_layout(export):
    users = {u["id"]: u for u in export["users.json"]}
    channels = {c["name"]: c for c in export["channels.json"]}
    assert DEMO_PERSON in {u["name"] for u in users.values()}
    assert any(u["is_bot"] for u in users.values())
    day_files = [name for name in export if name not in ("users.json", "channels.json")]
    assert day_files
    for name in day_files:
        match = DAY_FILE.match(name)
        assert match, name
        assert match[1] in channels
        timestamps = [float(m["ts"]) for m in export[name]]
        assert timestamps == sorted(timestamps)
        for message in export[name]:
            assert message["type"] == "message"
            day = dt.datetime.fromtimestamp(float(message["ts"]), dt.UTC).date().isoformat()
            assert day == match[2], (name, message["ts"])
            assert message.get("user", "U0DEMOBOT1") in users
            for mentioned in re.findall(r"<@(U[A-Z0-9]+)>", message["text"]):
                assert mentioned in users
            for channel_id in re.findall(r"<#(C[A-Z0-9]+)\|", message["text"]):
                assert channel_id in {c["id"] for c in channels.values()}


def test_threads_are_consistent(export):
    messages = [m for name, content in export.items() if DAY_FILE.match(name) for m in content]
    by_ts = {m["ts"]: m for m in messages}
    replies = Counter(m["thread_ts"] for m in messages if m.get("thread_ts") and m["thread_ts"] != m["ts"])
    parents = [m for m in messages if m.get("reply_count")]
    assert len(parents) >= 50
    for parent in parents:
        assert parent["thread_ts"] == parent["ts"]
        assert parent["reply_count"] == replies[parent["ts"]] == len(parent["replies"])
        assert parent["latest_reply"] == parent["replies"][-1]["ts"]
        assert all(by_ts[r["ts"]]["thread_ts"] == parent["ts"] for r in parent["replies"])
    assert set(replies) <= {p["ts"] for p in parents}


def test_export_has_subtypes_mentions_links_and_channel_refs(export):
    messages = [m for name, content in export.items() if DAY_FILE.match(name) for m in content]
    subtypes = Counter(m.get("subtype") for m in messages)
    assert {"channel_join", "bot_message", "thread_broadcast", "channel_topic"} <= set(subtypes)
    texts = [m["text"] for m in messages]
    assert sum("<@U" in t for t in texts) >= 20
    assert any("<https://" in t for t in texts)
    assert any("<#C" in t for t in texts)


def test_people_have_distinct_styles(export):
    by_user = messages_by_user(export)
    margaret = by_user[DEMO_PERSON]
    long_ones = [t for t in margaret if len(t) >= 100]
    # Well over the 20 samples of >= 100 characters that training needs.
    assert len(long_ones) >= 60
    assert all(t.endswith(SIGN_OFF) and t.startswith("Thank you") for t in margaret)
    assert all(len(t) <= 70 and (":" in t or "✅" in t) for t in by_user["dev"])
    assert all(t.endswith("?") for t in by_user["sam"])
    assert all(t.startswith("fwiw") and t.endswith("ty!") for t in by_user["jo"])
    assert min(len(by_user[name]) for name in ("dev", "sam", "jo")) >= 30


def test_write_export_replaces_atomically(tmp_path):
    target = tmp_path / "ws.zip"
    target.write_text("old")
    write_export(target)
    assert zipfile.is_zipfile(target)
    assert [p.name for p in tmp_path.iterdir()] == ["ws.zip"]


def test_demo_questions_address_the_cloned_person_and_come_from_others():
    for person in PEOPLE:
        asked = demo_questions(person.id)
        assert len(asked) == 3
        assert all(asker != person and f"@{person.first_name}" in text for asker, text in asked)
        assert len({asker for asker, _ in asked}) == 3
