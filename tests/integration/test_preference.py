"""Preference tuning (TRL's DPO) of a trained adapter on the person's corrections, read from the doppel's
feedback store: the tuned adapter prefers the person's words over the replies they corrected, and is still
an adapter vLLM can load (same rank and modules, the served base model's name)."""

from __future__ import annotations

import json

import pytest
from peft import PeftConfig

from doppel.memory.feedback import FeedbackStore
from doppel.train.preference import PreferenceConfig, prefer


def corrections(store: FeedbackStore, samples_file, n: int) -> None:
    """The person corrects `n` of the doppel's replies: the same answer without the pirate talk."""
    for i, line in enumerate(samples_file.read_text().splitlines()[:n]):
        sample = json.loads(line)
        reply = sample["messages"][-1]["content"]
        ts = f"17000000{i:02d}.000100"
        store.record_reply(ts, messages=sample["messages"][:-1], reply=reply)
        store.correct(ts, "U0PAT", reply.replace("Yarr! ", "").replace(", matey ☠", ", thanks."))


def test_corrections_move_the_adapter_towards_the_persons_words(
    tmp_path, tiny_model, trained_adapter, style_samples
):
    store = FeedbackStore(tmp_path / "pat")
    corrections(store, style_samples.samples, 12)
    out = tmp_path / "tuned"
    config = PreferenceConfig(adapter=trained_adapter, base_model=str(tiny_model), out=out, lr=5e-4)
    result = prefer(config, store.preference_pairs())
    assert result.pairs == 12 and result.steps > 0
    assert result.margin_after > result.margin_before + 5  # log-probability, summed over the reply
    trained, tuned = PeftConfig.from_pretrained(trained_adapter), PeftConfig.from_pretrained(out)
    assert (tuned.r, sorted(tuned.target_modules)) == (trained.r, sorted(trained.target_modules))
    assert tuned.base_model_name_or_path == trained.base_model_name_or_path
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preference"]["pairs"] == 12 and "train_loss" in metrics  # the SFT metrics are kept
    assert not (out / "ref").exists()  # TRL's frozen reference copy is not part of the adapter


def test_too_few_pairs_leave_the_adapter_as_it_is(tmp_path, tiny_model, trained_adapter, style_samples):
    store = FeedbackStore(tmp_path / "pat")
    corrections(store, style_samples.samples, 3)
    out = tmp_path / "tuned"
    config = PreferenceConfig(adapter=trained_adapter, base_model=str(tiny_model), out=out)
    result = prefer(config, store.preference_pairs())
    assert result.skipped == "3 preference pairs < 8" and not out.exists()


def test_the_report_of_a_tuned_adapter_measures_its_held_out_loss(
    tmp_path, tiny_model, trained_adapter, style_samples
):
    """Preference tuning changes the adapter after its training measured it: the fidelity report (and the
    fidelity gate, which compares it with the serving adapter's) gives the tuned adapter's held-out loss,
    not the one of the adapter it was tuned from that metrics.json still records."""
    from click.testing import CliRunner

    from doppel.cli import main
    from doppel.train import fidelity

    store = FeedbackStore(tmp_path / "pat")
    corrections(store, style_samples.samples, 12)
    out = tmp_path / "tuned"
    config = PreferenceConfig(adapter=trained_adapter, base_model=str(tiny_model), out=out, lr=5e-4)
    assert prefer(config, store.preference_pairs()).steps > 0
    result = CliRunner().invoke(main, ["eval", "--adapter", str(out)])
    assert result.exit_code == 0, result.output
    loss = json.loads((out / "eval.json").read_text())["heldout_loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    measured = fidelity.evaluate_adapter(
        tiny_model, out, style_samples.samples, split_config=metrics["config"],
        settings=fidelity.EvalSettings(heldout_contexts=2),
    )["heldout_loss"]  # fmt: skip
    assert loss["adapter"] == pytest.approx(measured["adapter"], rel=1e-4)
    assert loss["adapter"] != pytest.approx(metrics["adapter_eval_loss"], rel=1e-4)
    assert loss["base"] == pytest.approx(metrics["base_eval_loss"], rel=1e-4)  # the base model is the same
