"""`doppel scrape --export` on three real Slack exports nobody here wrote, checked as their user would.

The exports (../shared/real-exports, see SOURCES.md there) are a 2016 workspace with no threads at all, an
obfuscated 2025 slackdump export, and zulip's Slack-importer fixtures; the tests skip without them.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests.support.real_exports import HFARAN, RUSQ, ZULIP, real_export

from doppel.cli import main
from doppel.slack.normalize import message_text

# Slack user, channel and file IDs as they would leak: a capital letter then 8+ capitals and digits.
RAW_ID = re.compile(r"\b[UCFWGD](?=[0-9A-Z]*\d)[0-9A-Z]{8,}\b")
HFARAN_PEOPLE = ["U0BMQB6JE", "U0BMS113R", "U0BMYT2FL", "U0BMM2FEH"]
ZULIP_PEOPLE = ["U061A5N1G", "U061A1R2R", "U06NU4E26M9", "U6006P1CN", "U8W3QFGQ5"]
RUSQ_PEOPLE = ["UOF82F39AE", "UOB5F987BF17"]


def scrape(export: Path, user: str, out: Path, *args: str) -> Any:
    argv = ["scrape", "--export", str(export), "--user", user, "--out", str(out), *args]
    return CliRunner().invoke(main, argv)


def samples(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def contents(sample: dict[str, Any]) -> list[str]:
    return [m["content"] for m in sample["messages"]]


def one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doppel: error: "), result.stderr
    return lines[0]


def test_unthreaded_answers_get_the_question_asked_before_them(tmp_path):
    """The 2016 export has no threads: an answer's context is the channel talk just before it."""
    export = real_export(HFARAN)
    result = scrape(export, "hamza", tmp_path, "--min-length", "20")
    assert result.exit_code == 0, result.output
    (answer,) = [
        s for s in samples(tmp_path) if s["messages"][-1]["content"].endswith('Just "install" the executor.')
    ]
    assert answer["messages"][-2]["role"] == "user"
    assert "abilinski: what should setup.py do?" in answer["messages"][-2]["content"]
    # The export is from 2016: the cutoff counts back from its newest message, not from today.
    assert manifest(tmp_path)["cutoff"].startswith("2015-03")


def test_a_window_ends_at_a_long_pause(tmp_path):
    export = real_export(HFARAN)
    gap = scrape(export, "hamza", tmp_path / "gap", "--min-length", "20", "--window-gap-minutes", "0")
    assert gap.exit_code == 0, gap.output
    (answer,) = [s for s in samples(tmp_path / "gap") if s["messages"][-1]["content"].endswith("executor.")]
    # With no gap allowed, the question a minute before is another window: the answer stands alone.
    assert "what should setup.py do" not in json.dumps(answer)


@pytest.mark.parametrize(
    ("name", "people"), [(HFARAN, HFARAN_PEOPLE), (ZULIP, ZULIP_PEOPLE), (RUSQ, RUSQ_PEOPLE)]
)
def test_no_boilerplate_ids_or_markup_in_any_sample(tmp_path, name, people):
    export = real_export(name)
    for person in people:
        out = tmp_path / person
        # Everything taken (a long cutoff, no length limit, pastes cut rather than dropped).
        result = scrape(
            export, person, out, "--min-length", "1", "--cutoff-days", "10000", "--paste-action", "cut"
        )
        assert result.exit_code == 0, result.output
        for sample in samples(out):
            for text in contents(sample):
                assert "uploaded a file" not in text and "commented on" not in text, text
                assert "(tel:" not in text and "mailto:" not in text, text
                assert not RAW_ID.search(text), text
                assert not re.search(r"<[@#!][^>]*>|&gt;|&lt;|&amp;", text), text
                assert "\n\n\n" not in text, text


def test_file_shares_and_comments_keep_only_the_persons_words(tmp_path):
    export = real_export(ZULIP)
    assert scrape(export, "U6006P1CN", tmp_path, "--min-length", "1", "--cutoff-days", "10000").exit_code == 0
    replies = [s["messages"][-1]["content"] for s in samples(tmp_path)]
    # "<@U6006P1CN> uploaded a file: <...|dirac72.md> and commented: test upload attachment"
    assert any(r.endswith("test upload attachment") and "dirac72" not in r for r in replies), replies

    hermione = tmp_path / "hermione"
    assert scrape(real_export(HFARAN), "doubledeez", hermione, "--min-length", "1").exit_code == 0
    # A file_comment carries its author in `comment.user`, not `user`: it is her own sample.
    comments = [s for s in samples(hermione) if s["meta"].get("subtype") == "file_comment"]
    assert comments and "'Holmesville'" in comments[0]["messages"][-1]["content"]


def test_canvas_unknown_user_and_unknown_channel_read_as_words(tmp_path):
    export = real_export(ZULIP)
    assert scrape(export, "pieterceka123", tmp_path, "--min-length", "1").exit_code == 0
    text = "\n".join(s["messages"][-1]["content"] for s in samples(tmp_path))
    assert "Weekly Sync" in text  # the canvas F07A32DC2GG, by its title
    assert "@Peter test user mention @someone" in text
    assert "#some-channel #rich-text-blocks #general" in text


def test_rich_text_blocks_read_like_the_text_slack_wrote_beside_them():
    """A message with only blocks reads as Slack's own `text` for it (style marks aside)."""
    with zipfile.ZipFile(real_export(ZULIP)) as archive:
        messages = [
            m
            for name in archive.namelist()
            if name.startswith("rich-text-blocks/") and name.endswith(".json")
            for m in json.loads(archive.read(name))
        ]
    users, channels = {"U06NU4E26M9": "Peter"}, {"C0AHX20ADQQ": "rich-text-blocks", "C06P6T3QGD7": "general"}

    def plain(text: str) -> str:
        return " ".join(re.sub(r"[*_~`]", "", text).split())

    assert len(messages) == 8
    for message in messages:
        from_text = message_text(message, users, channels)
        from_blocks = message_text({**message, "text": ""}, users, channels)
        assert from_blocks and plain(from_blocks) == plain(from_text), message["text"]


def test_replies_follow_their_root_even_when_stamped_before_it(tmp_path):
    export = real_export(ZULIP)
    assert scrape(export, "U061A1R2R", tmp_path, "--min-length", "1", "--cutoff-days", "10000").exit_code == 0
    (early,) = [s for s in samples(tmp_path) if s["meta"]["ts"] == "1449868294.000007"]
    assert early["meta"]["thread_ts"] == "1539868294.000007"  # the reply is older than its root
    assert early["messages"][-1]["content"] == "another thread message\nanother reply"


def test_archived_channels_are_taken_from_an_export_unless_excluded(tmp_path):
    export = real_export(ZULIP)
    result = scrape(export, "U6006P1CN", tmp_path / "all", "--min-length", "1", "--cutoff-days", "10000")
    assert result.exit_code == 0, result.output
    assert {s["meta"]["channel"] for s in samples(tmp_path / "all")} == {"random"}
    listed = manifest(tmp_path / "all")["channels"]
    assert "skipped" not in listed["random"] and listed["random"]["samples"] >= 1
    # Every channel is listed, with what was taken; DMs are not taken unless asked for.
    assert {"general", "feedback", "rich-text-blocks"} <= listed.keys()

    out = tmp_path / "live"
    line = one_line_error(
        scrape(export, "U6006P1CN", out, "--min-length", "1", "--cutoff-days", "10000", "--exclude-archived")
    )
    assert "all 3 messages of Josef K. are in channels not taken" in line and "#random: archived" in line
    assert not out.exists()


def test_a_person_with_no_samples_gets_the_reason(tmp_path):
    export = real_export(ZULIP)
    nothing = one_line_error(scrape(export, "U066MTL5U", tmp_path / "john"))
    assert "John wrote no messages in the channels taken" in nothing
    short = one_line_error(scrape(export, "jane", tmp_path / "short", "--min-length", "5000"))
    assert "messages of Jane after the cutoff are shorter than --min-length 5000" in short
    assert not any((tmp_path / d).exists() for d in ("john", "short"))


def test_a_person_who_left_before_the_export_was_taken_is_learnt_from_their_own_last_year(tmp_path):
    export = real_export(ZULIP)
    # Rhea's last message is from 2018-01-20; the export's newest from 2026.
    result = scrape(export, "U8W3QFGQ5", tmp_path, "--min-length", "1")
    assert result.exit_code == 0, result.output
    assert manifest(tmp_path)["cutoff"].startswith("2017-01-20")
    assert samples(tmp_path) and all(s["meta"]["user"] == "U8W3QFGQ5" for s in samples(tmp_path))


def test_pastes_are_dropped_or_cut_and_counted(tmp_path):
    export = real_export(HFARAN)
    assert scrape(export, "doubledeez", tmp_path / "drop", "--min-length", "1").exit_code == 0
    dropped = manifest(tmp_path / "drop")
    assert dropped["dropped"]["paste"] >= 3
    assert not any("Traceback" in s["messages"][-1]["content"] for s in samples(tmp_path / "drop"))

    cut_dir = tmp_path / "cut"
    args = ("--min-length", "1", "--paste-action", "cut", "--paste-chars", "300")
    assert scrape(export, "doubledeez", cut_dir, *args).exit_code == 0
    cut = manifest(cut_dir)
    assert cut["cut"]["paste"] >= 3 and "paste" not in cut["dropped"]
    pasted = [s for s in samples(cut_dir) if "Traceback" in s["messages"][-1]["content"]]
    assert pasted and all(len(s["messages"][-1]["content"].split("\n", 1)[-1]) < 2000 for s in pasted)


def test_threads_tombstones_and_files_of_a_slackdump_export(tmp_path):
    export = real_export(RUSQ)
    result = scrape(export, "UOB5F987BF17", tmp_path / "b", "--min-length", "1")
    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "b")["skipped"]["subtype:tombstone"] == 1
    # The live reply to the deleted parent is still a sample, its context opening the thread.
    (orphan,) = [s for s in samples(tmp_path / "b") if s["meta"]["thread_ts"] == "1736554828.343759"]
    assert orphan["messages"][1]["content"].startswith("(a new thread")
    # Replies spread over later days follow their root: the reply to the first thread has it as context.
    (reply,) = [s for s in samples(tmp_path / "b") if s["meta"]["ts"] == "1736554746.482349"]
    assert reply["messages"][1]["content"].startswith("WgO268Xc0KtFylJ: dtUeWsjQpQO8")
    # A file posted without text says nothing of the person: no sample, counted as empty.
    assert scrape(export, "UOF82F39AE", tmp_path / "f", "--min-length", "1").exit_code == 0
    assert manifest(tmp_path / "f")["dropped"]["empty"] == 1
