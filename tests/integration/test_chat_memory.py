"""`doppel chat --json` with the memory beside the adapter: the reply, the messages it drew on, and an honest
"I don't know" for what the person never wrote about (a subprocess, the tiny model in process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from tests.unit.test_memory_index import RECORDS, T0

from doppel.memory.index import entries_from_samples, write_index


@pytest.fixture
def adapter_with_memory(tmp_path, trained_adapter):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    entries = entries_from_samples(RECORDS)
    write_index(entries, adapter / "memory", team="T1", person_id="U1", person_name="Alice Smith")
    return adapter


def chat(adapter, tiny_model, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "doppel.cli", "chat", "--adapter", str(adapter),
        "--base-model", str(tiny_model), "--person", "Alice Smith",
        "--temperature", "0", "--max-tokens", "8", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_json_reply_with_its_sources(adapter_with_memory, tiny_model):
    result = chat(
        adapter_with_memory,
        tiny_model,
        "--once",
        "which database does billing use?",
        "--json",
        "--workspace-url",
        "https://acme.slack.com",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"reply", "sources", "abstained"}
    assert answer["abstained"] is False and isinstance(answer["reply"], str)
    first = answer["sources"][0]
    assert set(first) == {"channel", "ts", "permalink", "text"}
    assert first["channel"] == "billing" and "Postgres 16" in first["text"]
    assert first["permalink"] == f"https://acme.slack.com/archives/CBILLING/p{f'{T0:.6f}'.replace('.', '')}"


def test_json_abstains_on_what_the_person_never_wrote_about(adapter_with_memory, tiny_model):
    result = chat(adapter_with_memory, tiny_model, "--once", "what is our GDPR retention policy?", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["abstained"] is True and answer["sources"] == []
    assert "Alice Smith" in answer["reply"] and "<@" not in answer["reply"]
    no_memory = chat(
        adapter_with_memory,
        tiny_model,
        "--once",
        "what is our GDPR retention policy?",
        "--json",
        "--no-memory",
    )
    assert json.loads(no_memory.stdout)["abstained"] is False  # the adapter alone always answers


def test_json_needs_one_message(adapter_with_memory, tiny_model):
    result = chat(adapter_with_memory, tiny_model, "--json")
    assert result.returncode == 2 and "--json answers one message" in result.stderr
