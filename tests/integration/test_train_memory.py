"""`doppel train` with memory and feedback, on the demo workspace's real scrape and the tiny model: the index
lands in the adapter directory (the person's and workspace's own), the samples are trained with memory
from other, older conversations only, and the person's corrections are trained on, weighted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from doppel.cli import main
from doppel.demo.workspace import EXPORTED_AT, MARGARET, TEAM_ID, write_export
from doppel.memory.feedback import CORRECTION_WEIGHT, FeedbackStore
from doppel.memory.index import MemoryIndex
from doppel.slack.conversation import memory_of
from doppel.slack.export import scrape_export
from doppel.slack.samples import ScrapeOptions
from doppel.train.data import load_samples, split_by_time

EMAIL = "margaret.hale@example.org"
QUICK = ["--epochs", "1", "--batch-size", "8", "--grad-accum", "1", "--max-length", "384", "--no-eval"]


def demo_samples(tmp_path: Path) -> Path:
    export = write_export(tmp_path / "workspace.zip")
    out = tmp_path / "data"
    options = ScrapeOptions(cutoff_days=3650, min_length=20, now=EXPORTED_AT.timestamp())
    scrape_export(export, MARGARET.name, out, options)
    return out / "samples.jsonl"


def no_sign_off(store: FeedbackStore, records: list[dict]) -> None:
    """Margaret corrects the doppel's reply to each of `records`: no sign-off, as the bot records it."""
    for i, record in enumerate(records):
        ts = f"17000000{i:02d}.000100"
        store.record_reply(ts, messages=record["messages"][:-1], reply="Kind regards, Margaret")
        store.correct(ts, MARGARET.id, "Ship it, no sign-off needed.")


def test_train_writes_memory_beside_the_adapter_and_learns_the_corrections(tmp_path, tiny_model):
    samples = demo_samples(tmp_path)
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    doppel_dir = tmp_path / "doppel"
    no_sign_off(FeedbackStore(doppel_dir), records[:2])
    out = tmp_path / "adapters" / "v1"

    args = ["train", "--data", str(samples), "--base-model", str(tiny_model), "--out", str(out)]
    result_file = tmp_path / "result.json"
    result = CliRunner().invoke(
        main,
        [*args, "--feedback-from", str(doppel_dir), *QUICK],
        env={"DOPPEL_RESULT_FILE": str(result_file)},
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result_file.read_text())
    assert summary["corrections"] == 2
    assert summary["memory"]["messages"] == len(records)
    assert 0 < summary["memory"]["samples_with_memory"] < len(records)  # the oldest have nothing older
    assert summary["preference"]["skipped"] == "2 preference pairs < 8"

    # The index is the person's, of their workspace, inside the adapter: versioned and removed with it.
    index = MemoryIndex.load(out / "memory", team=TEAM_ID, person_id=MARGARET.id)
    assert len(index.entries) == len(records)
    assert [p.name for p in out.parent.iterdir()] == ["v1"]  # no staging directory left

    trained = [
        json.loads(line) for line in (samples.parent / "samples.remembered.jsonl").read_text().splitlines()
    ]
    assert len(trained) == len(records) + 2
    # Every remembered line is a message from another conversation, older than the reply being trained
    # (the demo repeats some phrasings word for word: a line counts if any such message reads so).
    lines: dict[str, list] = {}
    for entry in index.entries:
        lines.setdefault(entry.line(), []).append(entry)
    for record in trained[: len(records)]:
        system, meta = record["messages"][0]["content"], record["meta"]
        if not memory_of(system):
            continue
        for line in memory_of(system).split("\n["):
            line = line if line.startswith("[") else "[" + line
            assert any(
                float(e.ts) < float(meta["ts"]) and e.thread != f"{meta['channel_id']}/{meta['thread_ts']}"
                for e in lines[line]
            ), line
    corrections = [r for r in trained if r["meta"].get("source") == "correction"]
    assert [r["meta"]["weight"] for r in corrections] == [CORRECTION_WEIGHT] * 2
    assert all(r["messages"][-1]["content"] == "Ship it, no sign-off needed." for r in corrections)

    # Held-out evaluation sees only the training split: a held-out sample's memory is all from before the
    # cut (never an older held-out message), and the corrections are trained on, never held out.
    split = split_by_time(load_samples(samples.parent / "samples.remembered.jsonl"), 0.15)
    assert split.cut_ts is not None and split.eval
    held = [r for r in trained[: len(records)] if float(r["meta"]["ts"]) >= split.cut_ts]
    remembered = [r for r in held if memory_of(r["messages"][0]["content"])]
    assert remembered  # the demo repeats its subjects: held-out questions do find older answers
    for record in remembered:
        for line in memory_of(record["messages"][0]["content"]).split("\n["):
            line = line if line.startswith("[") else "[" + line
            assert any(float(e.ts) < split.cut_ts for e in lines[line]), line
    trained_replies = {s.messages[-1]["content"] for s in split.train}
    assert "Ship it, no sign-off needed." in trained_replies
    assert all(float(r["meta"]["ts"]) < split.cut_ts for r in corrections)


def test_no_memory_leaves_the_adapter_as_before(tmp_path, tiny_model):
    samples = demo_samples(tmp_path)
    out = tmp_path / "adapters" / "v1"
    args = [
        "train",
        "--data",
        str(samples),
        "--base-model",
        str(tiny_model),
        "--out",
        str(out),
        "--no-memory",
    ]
    result = CliRunner().invoke(main, [*args, *QUICK])
    assert result.exit_code == 0, result.output
    assert not (out / "memory").exists() and not (samples.parent / "samples.remembered.jsonl").exists()


def test_memory_holds_the_persons_messages_too_short_to_train_on(tmp_path, tiny_model):
    export = write_export(tmp_path / "workspace.zip")
    out = tmp_path / "data"
    manifest = scrape_export(export, MARGARET.name, out, ScrapeOptions(now=EXPORTED_AT.timestamp()))
    samples = out / "samples.jsonl"
    adapter = tmp_path / "adapters" / "v1"
    args = ["train", "--data", str(samples), "--base-model", str(tiny_model), "--out", str(adapter)]
    result = CliRunner().invoke(main, [*args, *QUICK])
    assert result.exit_code == 0, result.output

    index = MemoryIndex.load(adapter / "memory", team=TEAM_ID, person_id=MARGARET.id)
    assert len(index.entries) == manifest.memory > manifest.samples
    trained = {json.loads(line)["meta"]["ts"] for line in samples.read_text().splitlines()}
    short = [e for e in index.entries if e.ts not in trained]
    assert short and all(20 <= len(e.text) < 100 for e in short)
    # A short message is retrieved like any other, with the message it answered.
    hits = index.search(short[-1].text, budget_tokens=10_000, min_coverage=0.0).hits
    assert any(h.entry.ts not in trained and h.entry.answered for h in hits)


@pytest.mark.parametrize(("scrape_args", "trained_as"), [([], "<email>"), (["--no-scrub"], EMAIL)])
def test_corrections_are_trained_scrubbed_as_the_samples_were(tmp_path, tiny_model, scrape_args, trained_as):
    """A doppel scraped with --no-scrub learns its person's corrections as written, an email included; one
    scraped as by default learns them scrubbed."""
    export = write_export(tmp_path / "workspace.zip")
    data = tmp_path / "data"
    scrape = ["scrape", "--export", str(export), "--user", MARGARET.name, "--out", str(data)]
    result = CliRunner().invoke(main, [*scrape, "--cutoff-days", "3650", "--min-length", "20", *scrape_args])
    assert result.exit_code == 0, result.output
    samples = data / "samples.jsonl"
    record = json.loads(samples.read_text().splitlines()[0])
    store = FeedbackStore(data)  # as the bot records a "Correct this"
    store.record_reply("1700000000.000100", messages=record["messages"][:-1], reply="Kind regards, Margaret")
    store.correct("1700000000.000100", MARGARET.id, f"Write to {EMAIL} about it.")

    out = tmp_path / "adapters" / "v1"
    args = ["train", "--data", str(samples), "--base-model", str(tiny_model), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--feedback-from", str(data), "--no-memory", *QUICK])
    assert result.exit_code == 0, result.output
    trained = [json.loads(line) for line in (data / "samples.remembered.jsonl").read_text().splitlines()]
    corrections = [r for r in trained if r["meta"].get("source") == "correction"]
    assert [r["messages"][-1]["content"] for r in corrections] == [f"Write to {trained_as} about it."]


def test_a_failure_after_the_adapter_is_written_leaves_no_output_and_the_rerun_trains(
    tmp_path, tiny_model, monkeypatch
):
    """Preference tuning failing (a GPU out of memory, an interrupt) once the adapter is trained: no adapter
    without its memory or tuning is left at --out, and the same command run again (a Job's retry) trains."""
    import doppel.train.stage as stage

    samples = demo_samples(tmp_path)
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    no_sign_off(FeedbackStore(tmp_path / "doppel"), records[:8])
    out = tmp_path / "adapters" / "v1"
    args = ["train", "--data", str(samples), "--base-model", str(tiny_model), "--out", str(out)]
    args += ["--feedback-from", str(tmp_path / "doppel"), *QUICK]

    def out_of_memory(*_: object, **__: object) -> None:
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as patched:
        patched.setattr(stage, "prefer", out_of_memory)
        failed = CliRunner().invoke(main, args)
    assert failed.exit_code != 0 and "CUDA out of memory" in failed.output
    assert not out.exists() and list(out.parent.iterdir()) == []
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (out / "adapter_config.json").is_file() and (out / "memory").is_dir()
