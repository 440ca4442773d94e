"""eval.json's memory figures on a real export, driven through `doppel scrape` and `doppel train` as a user
would: the held-out questions with a basis include the person's short messages after the cut (memory.jsonl),
not only the few held-out samples, and nothing they were asked or answered is in the index the questions
are answered from. The tiny model answers (the figures' values are SmolLM2's business: docs/memory.md);
skips when the real exports are absent."""

from __future__ import annotations

import json

from click.testing import CliRunner
from tests.support.real_exports import real_export

from doppel.cli import main
from doppel.train import data
from doppel.train.memory_eval import QUESTIONS

HYPERLEDGER = "hyperledger-slack/hyperledger-slack.zip"
PERSON = "U0KPFAZNF"  # its most active person


def test_memory_figures_ask_the_persons_later_questions_from_their_earlier_messages(tmp_path, tiny_model):
    export = real_export(HYPERLEDGER)
    out = tmp_path / "data"
    scraped = CliRunner().invoke(
        main, ["scrape", "--export", str(export), "--user", PERSON, "--out", str(out)]
    )
    assert scraped.exit_code == 0, scraped.output
    adapter = tmp_path / "adapter"
    argv = [
        "train",
        "--data",
        str(out / "samples.jsonl"),
        "--base-model",
        str(tiny_model),
        "--out",
        str(adapter),
    ]
    quick = ["--epochs", "1", "--batch-size", "8", "--grad-accum", "1", "--max-length", "512"]
    trained = CliRunner().invoke(main, [*argv, *quick])
    assert trained.exit_code == 0, trained.output
    assert "answer in the reply on" in trained.output

    figures = json.loads((adapter / "eval.json").read_text())["memory"]
    split = data.split_by_time(data.load_samples(out / "samples.remembered.jsonl"), 0.15)
    held_replies = {s.reply for s in split.eval}
    later = {
        m["text"]: m
        for line in (out / "memory.jsonl").read_text().splitlines()
        if float((m := json.loads(line))["ts"]) >= split.cut_ts
    }
    # Every question with a basis is answered, up to the cap: a long one clipped as the report clips it.
    assert figures["replied"] == min(figures["questions"], QUESTIONS) >= 3
    for example in figures["examples"]:
        assert example["real"] in later  # the person's reply, written after the cut
    # Not only the held-out samples: messages too short to train on ask questions too.
    assert any(e["real"] not in held_replies for e in figures["examples"])
    assert all(0.0 <= figures["contains_answer"][k] <= 1.0 for k in ("with_memory", "without_memory"))
    # Whether retrieval put the answer within reach, beside whether the replies hold it.
    assert 0.0 <= figures["retrieved_answer"] <= 1.0 and "the memory retrieved holds it for" in trained.output
    assert figures["abstain"]["no_basis"] is not None and figures["no_basis_questions"] > 0
    # What abstention costs in the person's own workspace: every question asked of them after the cut.
    assert figures["asked_questions"] >= figures["questions"] and 0.0 <= figures["abstain"]["asked"] <= 1.0
    assert "all asked after the cut" in trained.output

    # `doppel eval` of the same adapter writes the same memory figures (the questions, answers and
    # abstention do not depend on the run that computes them).
    report = json.loads((adapter / "eval.json").read_text())
    del report["memory"]
    (adapter / "eval.json").write_text(json.dumps(report))
    evaluated = CliRunner().invoke(main, ["eval", "--adapter", str(adapter)])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads((adapter / "eval.json").read_text())["memory"]
    assert "answer in the reply on" in evaluated.output
    for key in (
        "questions",
        "replied",
        "retrieved_answer",
        "abstain",
        "asked_questions",
        "no_basis_questions",
    ):
        assert again[key] == figures[key], key
