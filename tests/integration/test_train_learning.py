"""Proof the adapter learned the person's style: lower held-out loss, and it changes what PEFT and the real
vLLM server generate."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from tests.support.model_fixtures import STYLE_MARKER, STYLE_PERSON, STYLE_PERSON_ID, StyleData
from transformers import AutoModelForCausalLM, AutoTokenizer

from doppel.slack.conversation import ThreadMessage, build_conversation
from doppel.train import data

PROMPT_CONTEXT = [ThreadMessage("U0BOB", "Bob", "is the newsletter ready for friday?")]


@pytest.fixture(scope="module")
def peft_model(tiny_model: Path, trained_adapter: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    return PeftModel.from_pretrained(base, trained_adapter).eval()


def _heldout_loss(model: torch.nn.Module, tokenizer, heldout: Path) -> float:
    """Mean loss per token of the person's replies in threads never trained on."""
    stats = data.EncodeStats()
    items = [e for s in data.load_samples(heldout) if (e := data.encode(s, tokenizer, 512, stats))]
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for item in items:
            out = model(input_ids=torch.tensor([item.input_ids]), labels=torch.tensor([item.labels]))
            n = sum(1 for label in item.labels[1:] if label != data.IGNORE_INDEX)
            loss_sum += out.loss.item() * n
            tokens += n
    return loss_sum / tokens


def test_adapter_heldout_loss_is_far_below_the_base_model(peft_model, tiny_model, style_samples: StyleData):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    adapter_loss = _heldout_loss(peft_model, tokenizer, style_samples.heldout)
    with peft_model.disable_adapter():
        base_loss = _heldout_loss(peft_model, tokenizer, style_samples.heldout)
    assert adapter_loss < 0.3 * base_loss, (adapter_loss, base_loss)


def test_peft_generation_speaks_in_the_persons_style(peft_model, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = build_conversation(STYLE_PERSON, STYLE_PERSON_ID, PROMPT_CONTEXT)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt

    def reply() -> str:
        out = peft_model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    adapted = reply()
    with peft_model.disable_adapter():
        base = reply()
    assert STYLE_MARKER in adapted, adapted
    assert STYLE_MARKER not in base, base


@pytest.mark.vllm
def test_adapter_loads_in_vllm_and_changes_generation(vllm_server, trained_adapter: Path):
    name = f"pat-{uuid.uuid4().hex[:8]}"
    messages = build_conversation(STYLE_PERSON, STYLE_PERSON_ID, PROMPT_CONTEXT)
    with httpx.Client(base_url=vllm_server.base_url, timeout=120.0) as client:
        loaded = client.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(trained_adapter)}
        )
        assert loaded.status_code == 200, loaded.text
        try:
            assert name in {m["id"] for m in client.get("/v1/models").json()["data"]}

            def reply(model: str) -> str:
                response = client.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": messages, "max_tokens": 24, "temperature": 0.0},
                )
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]

            adapted = reply(name)
            base = reply(vllm_server.served_model_name)
        finally:
            client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert STYLE_MARKER in adapted, adapted
    assert STYLE_MARKER not in base, base
    assert json.loads((trained_adapter / "adapter_config.json").read_text())["r"] <= vllm_server.max_lora_rank
