"""`doppel train` end to end on the tiny model: output, progress, determinism, early stopping, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from tests.support.model_fixtures import StyleData, train_quick_adapter, write_style_samples
from transformers import AutoModelForCausalLM, AutoTokenizer

from doppel.cli import main
from doppel.train import data, trainer

QUICK = ["--epochs", "1", "--batch-size", "8", "--grad-accum", "1", "--max-length", "256"]


def _train(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["train", *args], env=env)


def test_train_cli_writes_a_servable_adapter_with_progress(tmp_path, tiny_model, style_samples: StyleData):
    out = tmp_path / "adapters" / "v1"
    result_file = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "doppel.cli", "train", "--data", str(style_samples.samples),
        "--base-model", str(tiny_model), "--base-model-name", "doppel-tiny", "--out", str(out),
        "--rank", "4", "--alpha", "8", "--json-progress", *QUICK,
    ]  # fmt: skip
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "DOPPEL_RESULT_FILE": str(result_file)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    # stdout is nothing but JSON progress lines, one per step (plus evaluations), ending at the last step.
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    steps = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
    assert steps[-1]["step"] == steps[-1]["total_steps"] and steps[-1]["epoch"] == 1.0
    assert all(isinstance(e["loss"], float) for e in steps)
    assert any(e["event"] == "eval" for e in events)

    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
        "eval.json",  # the fidelity report (test_fidelity.py)
    }
    assert [p.name for p in out.parent.iterdir()] == ["v1"]  # no temporary directory left beside it
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "doppel-tiny"
    assert (config["r"], config["lora_alpha"], config["use_dora"], config["modules_to_save"]) == (
        4,
        8,
        False,
        None,
    )
    assert set(config["target_modules"]) == set(trainer.DEFAULT_TARGET_MODULES)
    weights = load_file(out / "adapter_model.safetensors")
    assert any("mlp.down_proj.lora_B" in k for k in weights) and any("self_attn.q_proj" in k for k in weights)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == sum(1 for _ in style_samples.samples.open())
    assert metrics["person"] == style_samples.person_name
    held = metrics["heldout"]  # the split by time; what sits next to the held-out replies is left out
    assert (held["train"], held["heldout"]) == (metrics["train_samples"], metrics["eval_samples"])
    assert sum(held[k] for k in ("train", "heldout", "straddling", "leaking")) == metrics["samples"]
    assert metrics["steps"] == len(steps) and len(metrics["train_loss"]) == len(steps)
    assert metrics["tokens"] > metrics["label_tokens"] > 0
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_bytes"] > 0
    assert metrics["base_eval_loss"] > metrics["adapter_eval_loss"]
    assert metrics["base_perplexity"] == pytest.approx(2.718281828 ** metrics["base_eval_loss"])

    result = json.loads(result_file.read_text())
    assert result["ok"] is True and result["adapter"] == str(out) and result["steps"] == len(steps)
    assert result["adapter_eval_loss"] == pytest.approx(metrics["adapter_eval_loss"])
    # The fidelity headline, which the operator copies into status.eval.
    assert result["eval"]["heldout_loss_adapter"] == pytest.approx(metrics["adapter_eval_loss"], abs=1e-4)
    assert 0 <= result["eval"]["likeness_adapter"] <= 1


def test_same_seed_gives_the_same_adapter(tmp_path, tiny_model, style_samples: StyleData):
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / name)
        result = _train(
            "--data", str(style_samples.samples), "--base-model", str(tiny_model), "--out", str(outs[-1]),
            "--rank", "4", "--max-steps-per-epoch", "3", "--seed", "7", *QUICK,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    first, second = (load_file(o / "adapter_model.safetensors") for o in outs)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert any(bool(t.abs().sum()) for k, t in first.items() if "lora_B" in k)  # it did train


def test_early_stopping_keeps_the_best_adapter(tmp_path, tiny_model, style_samples: StyleData):
    # A learning rate this high makes the eval loss climb after a first gain: training stops early and the
    # adapter written is the best one seen, not the last.
    out = tmp_path / "out"
    config = trainer.TrainConfig(
        data=style_samples.samples,
        base_model=str(tiny_model),
        out=out,
        rank=4,
        lr=2.0,
        epochs=4,
        batch_size=8,
        grad_accum=1,
        eval_steps=1,
        early_stopping_patience=2,
        progress_bar=False,
    )
    metrics = trainer.train_adapter(config)
    assert metrics.stopped_early and metrics.steps < metrics.total_steps
    points = [(0, metrics.base_eval_loss)] + [(p["step"], p["loss"]) for p in metrics.eval_loss]
    best_step, best = min(points, key=lambda point: point[1])
    assert (metrics.best_step, metrics.adapter_eval_loss) == (best_step, best)
    assert 0 < best_step < metrics.steps
    assert json.loads((out / "metrics.json").read_text())["adapter_eval_loss"] == best

    # The saved adapter, loaded back with PEFT, scores exactly the best loss on the same held-out threads.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    stats = data.EncodeStats()
    split = data.split_by_time(data.load_samples(config.data), config.eval_fraction)
    held_out = [e for s in split.eval if (e := data.encode(s, tokenizer, 1024, stats))]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    reloaded = trainer.evaluate(model, data.eval_batches(held_out, 8), torch.device("cpu"))
    assert reloaded == pytest.approx(best, rel=1e-5)


def test_an_adapter_worse_than_the_base_model_is_kept_and_reported_as_worse(tmp_path, tiny_model):
    # The person's latest threads (held out) are in a style the base model already writes, unlike all
    # their earlier replies: an adapter that learnt those does worse there than the base model. It is still
    # the adapter written (the base model under the adapter's name would be a doppel that learnt nothing),
    # and its loss says worse.
    earlier = write_style_samples(tmp_path / "earlier", "Ahoy {topic}, all hands on deck")
    later = write_style_samples(tmp_path / "later", "Per my last email on {topic}: regards", seed=1)
    tuned = train_quick_adapter(tiny_model, later.samples, tmp_path / "later-adapter")
    base = tmp_path / "base"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tuned)
    merged.merge_and_unload().save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(earlier.samples.read_text() + later.heldout.read_text())
    out = tmp_path / "out"
    config = trainer.TrainConfig(
        data=samples, base_model=str(base), out=out, rank=8, alpha=16, lr=5e-3, epochs=6,
        batch_size=16, grad_accum=1, eval_steps=5, early_stopping_patience=100, progress_bar=False,
    )  # fmt: skip
    metrics = trainer.train_adapter(config)
    assert metrics.adapter_eval_loss > metrics.base_eval_loss
    assert metrics.best_step >= 1
    assert metrics.adapter_eval_loss == min(p["loss"] for p in metrics.eval_loss)
    weights = load_file(out / "adapter_model.safetensors")
    assert any(bool(t.abs().sum()) for k, t in weights.items() if "lora_B" in k)


def test_a_token_budget_takes_fewer_steps_of_longer_samples(tmp_path, tiny_model, style_samples: StyleData):
    # The same samples and steps asked: a budget of tokens that the first epoch's steps would exceed ends
    # training early, at the step the budget reaches, with the learning rate's schedule fitted to it.
    def run(name: str, budget: int | None) -> trainer.Metrics:
        config = trainer.TrainConfig(
            data=style_samples.samples, base_model=str(tiny_model), out=tmp_path / name, rank=4, epochs=2,
            max_steps_per_epoch=4, batch_size=4, grad_accum=1, max_train_tokens=budget, progress_bar=False,
        )  # fmt: skip
        return trainer.train_adapter(config)

    free = run("free", None)
    assert free.steps == free.total_steps == 8
    per_step = free.tokens / free.steps
    budgeted = run("budgeted", int(per_step * 3.5))
    assert budgeted.steps == budgeted.total_steps == 3
    assert budgeted.eval_loss[-1]["step"] == 3  # evaluated at its own last step


def test_a_token_budget_that_cannot_take_every_sample_once_trains_the_newest_it_can(
    tmp_path, tiny_model, style_samples: StyleData
):
    """A budget whose tokens hold about 24 of the samples: those are chosen (the newest distinct), each is
    trained once, the count reported is the count trained, and the fidelity report recomputes the choice."""
    from doppel.train.fidelity import split_samples

    def run(name: str, budget: int | None) -> trainer.Metrics:
        config = trainer.TrainConfig(
            data=style_samples.samples, base_model=str(tiny_model), out=tmp_path / name, rank=4, epochs=1,
            batch_size=4, grad_accum=1, max_train_tokens=budget, progress_bar=False,
        )  # fmt: skip
        return trainer.train_adapter(config)

    free = run("free", None)
    per_sample = free.tokens / free.train_samples
    budgeted = run("budgeted", int(per_sample * 24))
    chosen = budgeted.heldout["train"]
    assert 20 <= chosen <= 28 < budgeted.heldout["train_available"] == free.train_samples
    assert budgeted.train_samples == chosen and budgeted.steps in (chosen // 4, chosen // 4 - 1)
    assert budgeted.tokens >= 0.8 * chosen * per_sample  # nearly every chosen sample trained, none twice
    samples = data.load_samples(style_samples.samples)
    config = json.loads((tmp_path / "budgeted" / "metrics.json").read_text())["config"]
    recomputed = split_samples(samples, AutoTokenizer.from_pretrained(tiny_model), config)
    assert len(recomputed.train) == chosen
    # The newest distinct replies (the person repeats some replies word for word: each is learnt once).
    assert max(s.ts for s in recomputed.train) == max(s.ts for s in recomputed.before_cut)
    assert len({s.reply for s in recomputed.train}) == chosen


def test_the_reply_alone_can_be_trained_with_its_context_run_without_gradient(
    tmp_path, tiny_model, style_samples: StyleData
):
    """`--no-context-gradient` (the CPU budget's way): the adapter still learns the person's replies, every
    reply token of the samples is trained, and a context weight, which would need the context's
    gradient, is refused before anything is written."""
    base = ["--data", str(style_samples.samples), "--base-model", str(tiny_model), "--rank", "4", *QUICK]
    out = tmp_path / "replies"
    result = _train(*base, "--out", str(out), "--no-context-gradient", "--no-eval")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["context_gradient"] is False
    assert metrics["base_eval_loss"] > metrics["adapter_eval_loss"]
    whole = tmp_path / "whole"
    assert _train(*base, "--out", str(whole), "--no-eval").exit_code == 0
    assert json.loads((whole / "metrics.json").read_text())["label_tokens"] == metrics["label_tokens"]
    refused = tmp_path / "refused"
    result = _train(*base, "--out", str(refused), "--no-context-gradient", "--context-weight", "0.25")
    _assert_bad_input(result, "--context-weight learns the context", refused)


def test_max_steps_pass_over_every_sample_before_any_again(tmp_path, tiny_model, style_samples: StyleData):
    # `--max-steps` is the steps in all: a whole pass over the training samples, then the next pass cut short,
    # not epochs of a random part of them each.
    config = trainer.TrainConfig(
        data=style_samples.samples, base_model=str(tiny_model), out=tmp_path / "pass", rank=4, epochs=1,
        batch_size=4, grad_accum=1, progress_bar=False,
    )  # fmt: skip
    one_pass = trainer.train_adapter(config)
    out = tmp_path / "more"
    result = _train(
        "--data", str(style_samples.samples), "--base-model", str(tiny_model), "--out", str(out),
        "--rank", "4", "--batch-size", "4", "--grad-accum", "1", "--max-steps", str(one_pass.steps + 3),
        "--no-eval", "--no-memory", "--json-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "progress"]
    assert [e["step"] for e in progress] == list(range(1, one_pass.steps + 4))
    assert progress[one_pass.steps - 1]["epoch"] == 1.0  # the first pass is every sample, once
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == metrics["total_steps"] == one_pass.steps + 3
    assert metrics["tokens"] > one_pass.tokens
    assert 1 < metrics["epochs"] < 2


# --- bad input: exit 2, one line, nothing written ------------------------------------------------------


def _assert_bad_input(result, message: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0
    assert message in result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_too_few_samples(tmp_path, tiny_model, style_samples: StyleData):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(style_samples.samples.read_text().splitlines(keepends=True)[:5]))
    out = tmp_path / "out"
    result = _train("--data", str(few), "--base-model", str(tiny_model), "--out", str(out))
    _assert_bad_input(result, "not enough data (5 < 20)", out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = _train(
        "--data", str(empty), "--base-model", str(tiny_model), "--out", str(out), "--min-samples", "3"
    )
    _assert_bad_input(result, "not enough data (0 < 3)", out)


def test_no_minimum_of_samples_is_refused(tmp_path, tiny_model):
    """--min-samples 0 would let a run with nothing to train on go on to divide by its zero samples."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    result = _train(
        "--data", str(empty), "--base-model", str(tiny_model), "--out", str(out), "--min-samples", "0"
    )
    _assert_bad_input(result, "--min-samples must be at least 1", out)


def test_malformed_jsonl_names_the_line(tmp_path, tiny_model, style_samples: StyleData):
    lines = style_samples.samples.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:30]) + '{"messages": [oops\n' + "".join(lines[30:]))
    out = tmp_path / "out"
    result = _train("--data", str(bad), "--base-model", str(tiny_model), "--out", str(out))
    _assert_bad_input(result, "bad.jsonl:31: not valid JSON", out)


def test_a_reply_with_nothing_before_it_names_the_line(tmp_path, tiny_model, style_samples: StyleData):
    """A line of the person's reply alone (no system prompt, nothing it answers): the chat template has no
    prompt to render before it. Bad input, named by its line, rather than a crash part way."""
    lines = style_samples.samples.read_text().splitlines(keepends=True)
    alone = json.dumps({"messages": [{"role": "assistant", "content": "Yarr! all be shipshape, matey"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:30]) + alone + "\n" + "".join(lines[30:]))
    out = tmp_path / "out"
    result = _train("--data", str(bad), "--base-model", str(tiny_model), "--out", str(out), *QUICK)
    _assert_bad_input(result, "bad.jsonl:31: the person's reply needs a message before it", out)


def test_missing_inputs(tmp_path, tiny_model, style_samples: StyleData):
    out = tmp_path / "out"
    result = _train(
        "--data", str(tmp_path / "nope.jsonl"), "--base-model", str(tiny_model), "--out", str(out)
    )
    _assert_bad_input(result, "data file not found", out)
    missing_model = tmp_path / "no-such-model"
    result = _train(
        "--data", str(style_samples.samples), "--base-model", str(missing_model), "--out", str(out)
    )
    _assert_bad_input(result, f"base model {missing_model}: no model there", out)
    result = _train(
        "--data", str(style_samples.samples), "--base-model", str(tiny_model), "--out", str(out),
        "--target-modules", "no_such_proj",
    )  # fmt: skip
    _assert_bad_input(result, "--target-modules", out)


def test_existing_output_is_left_alone(tmp_path, tiny_model, style_samples: StyleData):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous adapter")
    result = _train("--data", str(style_samples.samples), "--base-model", str(tiny_model), "--out", str(out))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_gpu_out_of_memory_names_the_flags(tmp_path, tiny_model, style_samples: StyleData, monkeypatch):
    # No GPU here: make the training step raise the exception torch raises when CUDA memory runs out.
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_train_step", out_of_memory)
    out = tmp_path / "out"
    result = _train("--data", str(style_samples.samples), "--base-model", str(tiny_model), "--out", str(out))
    _assert_bad_input(result, "out of GPU memory", out)
    for flag in ("--batch-size", "--grad-accum", "--max-length", "--rank"):
        assert flag in result.stderr


def test_out_of_range_budget_flags_are_refused(tmp_path, tiny_model, style_samples: StyleData):
    out = tmp_path / "out"
    base = ["--data", str(style_samples.samples), "--base-model", str(tiny_model), "--out", str(out)]
    for flag, value in (
        ("--context-weight", "2"),
        ("--train-max-length", "0"),
        ("--max-train-tokens", "0"),
        ("--max-steps", "0"),
        ("--lr", "0"),
        ("--lr", "-1e-3"),
    ):
        result = _train(*base, flag, value)
        assert result.exit_code == 2 and flag in result.output
        assert not out.exists()
