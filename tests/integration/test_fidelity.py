"""`doppel eval`: the fidelity report (eval.json) of an adapter, through the command, on the tiny model.

The tiny model's adapter has learnt a fixed reply pattern (see model_fixtures); the tiny base model writes
noise. So the report must attribute the adapter's replies to the person and the base model's to the base.
The same report on SmolLM2 and the demo export is checked in test_local_demo.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from doppel.cli import main
from doppel.train import fidelity
from doppel.train.data import load_samples


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_eval_writes_the_report_beside_metrics(tmp_path, trained_adapter, style_samples):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    result = run("eval", "--adapter", str(adapter))  # data and base model: as recorded at training
    assert result.exit_code == 0, result.output
    report = json.loads((adapter / "eval.json").read_text())
    assert report["person"] == style_samples.person_name
    assert report["heldout_samples"] > 0 and report["train_samples"] > report["heldout_samples"]
    loss = report["heldout_loss"]
    assert loss["adapter"] < loss["base"]
    like = report["likeness"]
    assert like["adapter"] >= 0.8 and like["real"] >= 0.8
    assert like["prompted_base"] <= 0.2
    assert like["classifier_accuracy"] >= 0.6
    # What chance could move: intervals that hold each share, and a gap over the prompted base beyond them.
    spread = report["uncertainty"]
    for name in ("adapter", "prompted_base", "real"):
        low, high = spread["likeness"][name]
        assert low <= like[name] <= high
    assert spread["likeness_adapter_minus_prompted_base"]["interval"][0] > 0
    assert "adapter - prompted  likeness +" in result.output
    # The classes: the person, the base model and the colleagues by the user IDs of colleagues.jsonl.
    assert set(like["classes"]) == {"person", "base model", "Bob", "Ana", "Lin"}
    # Relevance is measured for both (what it measures: tests/unit/test_relevance.py); the tiny random model
    # learns the pattern but not to copy the topic into it, so neither side's figure says more here.
    assert all(-1 <= report["relevance"][side] <= 1 for side in ("adapter", "prompted_base"))
    assert report["copy_rate"]["adapter"] == 0.0  # six words: no 12-word span to copy
    assert 0 <= report["distinct"]["adapter"] <= 1
    # "Yarr! {topic} be shipshape, matey ☠": six words, and the adapter's replies about as long.
    assert report["length"]["person"] == 6.0
    assert abs(report["length"]["adapter"] - 6.0) <= 2
    assert len(report["examples"]) == 4
    for example in report["examples"]:
        assert {"context", "real", "adapter", "prompted_base"} <= set(example)
        assert "matey" in example["real"]
    # The printed table: the headline figures.
    assert "likeness" in result.output and "held-out loss" in result.output
    assert f"likeness            adapter {like['adapter']:.2f}" in result.output


def test_the_split_is_the_trainings_own(tmp_path, trained_adapter, style_samples):
    """The held-out replies of the report are exactly those the training evaluated on: the latest."""
    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(metrics["config"]["base_model"])
    config = metrics["config"]
    split = fidelity.split_samples(load_samples(style_samples.samples), tokenizer, config)
    assert len(split.eval) == metrics["eval_samples"] and len(split.train) == metrics["train_samples"]
    assert not {s.thread for s in split.eval} & {s.thread for s in split.train}
    assert max(s.ts for s in split.train) < min(s.ts for s in split.eval)
    assert split.summary == metrics["heldout"]


def test_a_budget_that_clips_training_samples_loses_none_and_the_report_sees_its_split(
    tmp_path, tiny_model, style_samples
):
    """A CPU budget clips its training samples shorter than the held-out ones (`train_max_length`); a sample
    that cannot be cut that short is trained at `max_length` rather than lost, and the report's split is the
    training's own."""
    from transformers import AutoTokenizer

    from doppel.train.trainer import TrainConfig, train_adapter

    config = TrainConfig(
        data=style_samples.samples, base_model=str(tiny_model), out=tmp_path / "adapter", rank=4, alpha=8,
        epochs=1, max_steps_per_epoch=1, batch_size=4, grad_accum=1, max_length=256, train_max_length=68,
        progress_bar=False,
    )  # fmt: skip
    metrics = train_adapter(config)  # 68 tokens: a third of the samples cannot be cut that short
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    split = fidelity.split_samples(load_samples(style_samples.samples), tokenizer, metrics.config)
    assert metrics.train_samples == len(split.train) == len(split.before_cut)  # every sample before the cut
    assert metrics.clipped > 0 and metrics.dropped_too_long == 0
    assert len(split.eval) == metrics.eval_samples and split.summary == metrics.heldout


def test_the_classifier_knows_the_person_from_every_reply_before_the_cut(trained_adapter, style_samples):
    """A CPU budget trains on a few of the person's replies (the most characteristic); the classifier that
    judges likeness learns the person from all of their replies before the cut, so that it does not favour
    the adapter that imitates the chosen few."""
    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(metrics["config"]["base_model"])
    budget = {**metrics["config"], "max_train_samples": 5}
    split = fidelity.split_samples(load_samples(style_samples.samples), tokenizer, budget)
    assert len(split.train) == 5 and len(split.before_cut) > 5
    texts, labels, _ = fidelity._classifier_data(split, [], [])
    assert labels.count(fidelity.PERSON_CLASS) == len(split.before_cut)
    assert sorted(texts) == sorted(s.reply for s in split.before_cut)


def test_long_held_out_contexts_are_prompted_as_training_clipped_them(
    tmp_path, trained_adapter, style_samples, monkeypatch
):
    """A thread longer than the training's sequence (a Japanese one of 4,000 characters is 4,400 tokens) is
    replied to from its newest messages, as the adapter learnt it: not from thousands of tokens at once."""
    from doppel.serve.local import LocalBackend

    records = [json.loads(line) for line in style_samples.samples.read_text().splitlines()]
    chatter = "\n".join(f"Bob: an old remark about the weather, number {i}" for i in range(300))
    for record in records[-20:]:  # the held-out ones and a few before them
        turn = next(m for m in record["messages"] if m["role"] == "user")
        turn["content"] = f"{chatter}\n{turn['content']}"
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.copy(style_samples.samples.with_name("colleagues.jsonl"), tmp_path / "colleagues.jsonl")
    config = json.loads((trained_adapter / "metrics.json").read_text())["config"]
    room = config["max_length"] - fidelity.EvalSettings().reply_tokens

    asked: list[list[dict[str, str]]] = []
    complete_batch = LocalBackend.complete_batch

    def recording(self, requests, params):
        asked.extend(messages for _, messages in requests)
        assert all(len(self.prompt_token_ids(messages)) <= room for _, messages in requests)
        return complete_batch(self, requests, params)

    monkeypatch.setattr(LocalBackend, "complete_batch", recording)
    base_model = Path(config["base_model"])
    report = fidelity.evaluate_adapter(base_model, trained_adapter, samples, split_config=config)
    assert report["replies"] > 0 and len(asked) >= report["replies"]
    held = [m for m in asked if "number 299" in json.dumps(m)]  # the newest of the old remarks is kept
    assert held and not any('number 0"' in json.dumps(m) for m in held)  # the oldest are not
    assert report["likeness"]["adapter"] >= 0.8  # the newest message still asks what the adapter answers


def test_the_gates_measure_of_the_serving_adapter_replies_only_with_that_adapter(
    tmp_path, trained_adapter, style_samples, train_style_adapter, monkeypatch
):
    """The fidelity gate measures the serving adapter on its successor's held-out replies. The prompted
    base's and the base model's replies do not depend on the adapter: they are taken from the successor's
    report, so only the serving adapter replies; its own figures are those a whole report gives."""
    from doppel.serve.local import LocalBackend

    candidate = tmp_path / "candidate"
    shutil.copytree(trained_adapter, candidate)
    assert run("eval", "--adapter", str(candidate)).exit_code == 0
    new = json.loads((candidate / "eval.json").read_text())
    serving = train_style_adapter("gate-serving", "Ahoy {topic}, all hands on deck")  # another style
    base_model = Path(json.loads((candidate / "metrics.json").read_text())["config"]["base_model"])

    requested: list[str] = []
    complete_batch = LocalBackend.complete_batch

    def counting(self, requests, params):
        requested.extend(adapter for adapter, _ in requests)
        return complete_batch(self, requests, params)

    monkeypatch.setattr(LocalBackend, "complete_batch", counting)
    quick = fidelity.evaluate_serving(base_model, serving, candidate, style_samples.samples, new)
    assert requested == ["adapter"] * new["replies"]  # the serving adapter's replies, nothing else
    requested.clear()
    config = json.loads((candidate / "metrics.json").read_text())["config"]
    whole = fidelity.evaluate_adapter(base_model, serving, style_samples.samples, split_config=config)
    assert len(requested) == 2 * new["replies"] + len(new["baseline"]["base"])

    assert quick["baseline"] == new["baseline"]  # the successor's, reused
    assert quick["heldout_loss"]["base"] == new["heldout_loss"]["base"]
    assert quick["heldout_loss"]["adapter"] == pytest.approx(whole["heldout_loss"]["adapter"], rel=1e-4)
    assert [e["adapter"] for e in quick["examples"]] == [e["adapter"] for e in whole["examples"]]
    assert "Ahoy" in quick["examples"][0]["adapter"]  # the serving adapter's own style, not the successor's
    assert quick["likeness"] == whole["likeness"] and quick["relevance"] == whole["relevance"]
    # Every reply the same, not just the figures: an adapter's batches hold its own requests only, so its
    # replies do not depend on whether the base model's were asked beside them.
    assert quick["per_reply"] == whole["per_reply"]
    # Reply by reply, on the same contexts: what the gate's paired tests weigh.
    pairs = fidelity.paired(new, quick)
    assert pairs is not None and len(pairs.person_new) == len(pairs.person_serving) == new["replies"]
    assert sum(pairs.person_new) / new["replies"] == pytest.approx(new["likeness"]["adapter"], abs=1e-3)
    assert len(pairs.relevance_serving) == new["replies"]
    # A report without the baseline (an older eval.json) is measured whole.
    del new["baseline"]
    requested.clear()
    fidelity.evaluate_serving(base_model, serving, candidate, style_samples.samples, new)
    assert len(requested) == 2 * new["replies"] + len(whole["baseline"]["base"])


def test_eval_bad_input(tmp_path, trained_adapter):
    missing = run("eval", "--adapter", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "does not exist" in missing.output
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    no_data = run("eval", "--adapter", str(adapter), "--data", str(tmp_path / "none.jsonl"))
    assert no_data.exit_code == 2 and "samples not found" in no_data.output
    assert not (adapter / "eval.json").exists()


def _measured_loss(base_model: Path, adapter: Path, samples: Path, config: dict) -> float:
    """The adapter's held-out loss on `samples`' held-out set, measured (nothing reused from training)."""
    return fidelity.evaluate_adapter(
        base_model, adapter, samples, split_config=config, settings=fidelity.EvalSettings(heldout_contexts=2)
    )["heldout_loss"]["adapter"]


def test_the_held_out_loss_is_of_the_samples_measured_on_after_a_new_scrape(
    tmp_path, tiny_model, style_samples
):
    """A scrape rewrites the person's samples.jsonl with their newer messages; `doppel eval` of an earlier
    adapter (its samples: as recorded) is then on the new held-out set, and so must be its held-out loss:
    not the training's loss on the old one, because a budget's held-out set has as many samples either way."""
    from doppel.train.trainer import TrainConfig, train_adapter

    data = tmp_path / "data" / "samples.jsonl"
    data.parent.mkdir()
    shutil.copy(style_samples.samples, data)
    shutil.copy(style_samples.samples.with_name("colleagues.jsonl"), data.with_name("colleagues.jsonl"))
    adapter = tmp_path / "v1"
    config = TrainConfig(
        data=data, base_model=str(tiny_model), out=adapter, rank=4, alpha=8, epochs=1, max_steps_per_epoch=2,
        batch_size=8, grad_accum=1, max_length=256, max_eval_samples=4, progress_bar=False,
    )  # fmt: skip
    metrics = train_adapter(config)
    # The next scrape: the person has answered more threads since (the held-out samples are as many).
    with data.open("a", encoding="utf-8") as handle:
        handle.write(style_samples.heldout.read_text(encoding="utf-8"))
    result = run("eval", "--adapter", str(adapter))
    assert result.exit_code == 0, result.output
    report = json.loads((adapter / "eval.json").read_text())
    assert report["heldout_samples"] == metrics.eval_samples == 4
    assert report["split"]["cut_ts"] != metrics.heldout["cut_ts"]
    measured = _measured_loss(tiny_model, adapter, data, metrics.config)
    assert report["heldout_loss"]["adapter"] == pytest.approx(measured, rel=1e-4)
    assert report["heldout_loss"]["adapter"] != pytest.approx(metrics.adapter_eval_loss, rel=1e-4)
