"""`doppel make-tiny-model`: a real, loadable, deterministic tiny chat model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from doppel.cli import main

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_make_tiny_model_is_complete_and_deterministic(tmp_path, tiny_model: Path):
    result = CliRunner().invoke(main, ["make-tiny-model", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    assert {p.name for p in again.iterdir()} == FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    for name in FILES:  # same seed, same bytes as the session's tiny model
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name

    other = tmp_path / "seed1"
    assert CliRunner().invoke(main, ["make-tiny-model", str(other), "--seed", "1"]).exit_code == 0
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_tiny_model_shape_suits_vllm_cpu(tiny_model: Path):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64


def test_chat_template_and_stop_token(tiny_model: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert json.loads((tiny_model / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "system", "content": "You are Pat."},
        {"role": "user", "content": "Bob: ça va? 🚀"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt  # byte-level: any text round-trips
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.eos_token_id == eot
    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert eot in generation["eos_token_id"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(ids)


def test_the_loss_over_labelled_positions_equals_the_models_own(tiny_model: Path):
    """The trainer applies the LM head to the labelled positions only: the loss and its gradients are the
    model's own (full logits, transformers' shifted cross-entropy), with and without the LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from doppel.train import data
    from doppel.train.trainer import token_loss_sum

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, not the zero-initialised one
            torch.nn.init.normal_(param, std=0.02)
    ignore = data.IGNORE_INDEX
    batch = data.collate(
        [
            data.Encoded([5, 9, 14, 3, 7, 8, 2], [ignore, ignore, ignore, 3, 7, 8, 2], "t1"),
            data.Encoded([4, 6, 11, 12], [ignore, ignore, 11, 12], "t2"),
        ]
    )
    device = torch.device("cpu")
    tensors = {key: torch.tensor(getattr(batch, key)) for key in ("input_ids", "labels", "attention_mask")}

    def gradients() -> list[torch.Tensor]:
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        return grads

    ours = token_loss_sum(model, batch, device)
    ours.backward()
    ours_grads = gradients()
    theirs = model(**tensors).loss * batch.label_tokens
    theirs.backward()
    assert torch.allclose(ours, theirs, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours_grads, gradients(), strict=True))
    assert batch.label_tokens == 6
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(token_loss_sum(model, batch, device), model(**tensors).loss * 6, rtol=1e-5)


def test_weighted_labels_weigh_their_token_losses(tiny_model: Path):
    """A context weight scales each context token's cross-entropy; the reply's count whole."""
    from doppel.train import data
    from doppel.train.trainer import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = [5, 9, 14, 3, 7, 8, 2]
    weights = [0.0, 0.25, 0.25, 1.0, 1.0, 1.0, 1.0]
    batch = data.collate([data.Encoded(ids, [data.IGNORE_INDEX, *ids[1:]], "t", weights=weights)])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        each = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        ours = token_loss_sum(model, batch, torch.device("cpu"))
    assert torch.allclose(ours, (each * torch.tensor(weights[1:])).sum(), rtol=1e-5)
    assert batch.label_weight == sum(weights)


def _lora_with_a_voice(tiny_model: Path) -> Any:
    """The tiny model under a LoRA adapter whose B matrices are not zero (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def test_training_the_reply_without_the_contexts_gradient_takes_the_same_loss(tiny_model: Path):
    """With the context run once without gradient (left-padded, its keys and values cached), the replies'
    loss is the model's own on the whole samples, padded or not; the adapter learns only through the
    replies' positions, and a step learns the same whatever the micro-batch size."""
    from doppel.train import data
    from doppel.train.trainer import reply_loss_sum, token_loss_sum

    model = _lora_with_a_voice(tiny_model)
    ignore = data.IGNORE_INDEX
    items = [
        data.Encoded([5, 9, 14, 3, 7, 8, 2], [ignore, ignore, ignore, 3, 7, 8, 2], "t1"),
        data.Encoded([4, 6, 11, 12], [ignore, ignore, 11, 12], "t2"),
        data.Encoded([4, 6, 10, 11, 13, 15, 12, 7, 9], [ignore] * 7 + [7, 9], "t3"),
    ]
    device = torch.device("cpu")
    whole = token_loss_sum(model, data.collate(items), device)
    together = reply_loss_sum(model, data.collate_replies(items), device)
    apart = sum(reply_loss_sum(model, data.collate_replies([item]), device) for item in items)
    assert data.collate_replies(items).label_tokens == 8
    assert torch.allclose(together, whole, rtol=1e-5)
    assert torch.allclose(apart, whole, rtol=1e-5)

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    batched = gradients(reply_loss_sum(model, data.collate_replies(items), device))
    single = gradients(sum(reply_loss_sum(model, data.collate_replies([i]), device) for i in items))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(batched, single, strict=True))
    assert any(g.abs().sum() > 0 for g in batched)
    # Through the replies alone: not the whole samples' gradient, which also flows through the contexts.
    full = gradients(token_loss_sum(model, data.collate(items), device))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(batched, full, strict=True))


def test_training_without_the_contexts_gradient_refuses_a_context_weight(tmp_path, tiny_model: Path):
    from doppel.errors import BadInput
    from doppel.train.trainer import TrainConfig, train_adapter

    samples = tmp_path / "samples.jsonl"
    samples.write_text("", encoding="utf-8")
    config = TrainConfig(
        data=samples,
        base_model=str(tiny_model),
        out=tmp_path / "a",
        context_weight=0.25,
        context_gradient=False,
    )
    with pytest.raises(BadInput, match="--context-weight learns the context"):
        train_adapter(config)


def test_the_replies_alone_refuse_a_model_whose_checkpointing_would_drop_the_contexts_cache(tiny_model: Path):
    """Checkpointed layers drop a key-value cache when training: the replies would attend to no context.
    The trainer never checkpoints in that mode (GPU training checkpoints otherwise), and says so if asked."""
    from peft import LoraConfig, get_peft_model

    from doppel.train import data
    from doppel.train.trainer import reply_loss_sum

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    ignore = data.IGNORE_INDEX
    batch = data.collate_replies([data.Encoded([5, 9, 14, 3, 7], [ignore, ignore, ignore, 3, 7], "t")])
    with pytest.raises(ValueError, match="drops the contexts' cache"):
        reply_loss_sum(model, batch, torch.device("cpu"))


def test_bfloat16_steps_cast_the_frozen_weights_once_and_learn_as_autocast_does(tiny_model: Path):
    """A training step with the frozen weights cast to bfloat16 beforehand takes the loss and gradient that
    autocast takes casting them at each forward; outside the step (evaluation) the model is float32 again."""
    from doppel.cpu import Bf16Steps
    from doppel.train import data
    from doppel.train.trainer import reply_loss_sum, token_loss_sum

    model = _lora_with_a_voice(tiny_model)
    ignore = data.IGNORE_INDEX
    items = [
        data.Encoded([5, 9, 14, 3, 7, 8, 2], [ignore, ignore, ignore, 3, 7, 8, 2], "t1"),
        data.Encoded([4, 6, 10, 11, 13, 15, 12, 7, 9], [ignore] * 7 + [7, 9], "t3"),
    ]
    device = torch.device("cpu")
    batch = data.collate_replies(items)

    def step(context: Any) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        with context:
            loss = reply_loss_sum(model, batch, device)
            loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    float32_loss = token_loss_sum(model, data.collate(items), device).item()
    autocast_loss, autocast_grads = step(torch.autocast("cpu", dtype=torch.bfloat16))
    bf16_steps = Bf16Steps(model, enabled=True)
    cast_loss, cast_grads = step(bf16_steps())
    assert cast_loss == autocast_loss != float32_loss  # bfloat16 arithmetic, exactly autocast's
    assert all(torch.equal(a, b) for a, b in zip(cast_grads, autocast_grads, strict=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert token_loss_sum(model, data.collate(items), device).item() == float32_loss
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with bf16_steps():  # inside a step: the frozen projections (and the head) are bfloat16
        assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16
        assert model.get_base_model().get_input_embeddings().weight.dtype == torch.float32
