"""A doppel never addresses the person themself, and addresses only someone in the conversation: adapters
that learnt to open with such an addressee, asked through `doppel chat` as a person would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.support.model_fixtures import STYLE_PERSON


def chat_once(adapter, model, text: str, *, vllm_url: str | None = None) -> str:
    server = ["--vllm-url", vllm_url] if vllm_url else ["--base-model", str(model)]
    backend = ["--adapter", str(adapter), *server, "--person", STYLE_PERSON]
    greedy = ["--temperature", "0", "--max-tokens", "24"]
    result = subprocess.run(
        [sys.executable, "-m", "doppel.cli", "chat", *backend, *greedy, "--json", "--once", text],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["reply"]


def test_an_adapter_that_learnt_to_address_the_person_no_longer_does(tiny_model, train_style_adapter):
    adapter = train_style_adapter("self-address", f"@{STYLE_PERSON} yarr {{topic}} ahoy")
    reply = chat_once(adapter, tiny_model, "any news on the retro?")
    assert f"@{STYLE_PERSON}" not in reply and not reply.startswith(f"{STYLE_PERSON}:")
    assert "ahoy" in reply  # the rest of what it learnt is still there


def test_an_invented_addressee_becomes_the_one_who_asked(tiny_model, train_style_adapter):
    adapter = train_style_adapter("invented-address", "@Zed yarr {topic} ahoy")
    reply = chat_once(adapter, tiny_model, "any news on the retro?")
    # In `doppel chat` the one asking is "You", the only other speaker of the conversation.
    assert reply.startswith("@You ") and "@Zed" not in reply


@pytest.mark.vllm
def test_through_vllm_the_person_is_never_addressed_either(vllm_server, tiny_model, train_style_adapter):
    """vLLM gets the banned words (`bad_words`) with the request; the repair covers the rest."""
    adapter = train_style_adapter("self-address", f"@{STYLE_PERSON} yarr {{topic}} ahoy")
    reply = chat_once(adapter, tiny_model, "any news on the retro?", vllm_url=vllm_server.base_url)
    assert f"@{STYLE_PERSON}" not in reply and "ahoy" in reply
