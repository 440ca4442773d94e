"""`doppel chat` with the memory beside the adapter: the reply, the messages it drew on, and an honest
"I don't know" for what the person never wrote about (a subprocess, the tiny model in process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from tests.support.model_fixtures import POSTGRES_PATTERN
from tests.unit.test_memory_index import RECORDS, T0

from doppel.memory.index import entries_from_samples, write_index


def with_memory(adapter, where):
    copy = where / "adapter"
    shutil.copytree(adapter, copy)
    entries = entries_from_samples(RECORDS)
    write_index(entries, copy / "memory", team="T1", person_id="U1", person_name="Alice Smith")
    return copy


@pytest.fixture
def adapter_with_memory(tmp_path, trained_adapter):
    return with_memory(trained_adapter, tmp_path)


@pytest.fixture
def postgres_adapter(tmp_path, train_style_adapter):
    return with_memory(train_style_adapter("postgres", POSTGRES_PATTERN), tmp_path)


def chat(adapter, tiny_model, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "doppel.cli", "chat", "--adapter", str(adapter),
        "--base-model", str(tiny_model), "--person", "Alice Smith",
        "--temperature", "0", "--max-tokens", "8", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, input=stdin)


def test_json_reply_with_the_sources_it_drew_on(postgres_adapter, tiny_model):
    result = chat(
        postgres_adapter,
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
    assert answer["abstained"] is False and "Postgres" in answer["reply"]
    [source] = answer["sources"]
    assert set(source) == {"channel", "ts", "permalink", "text"}
    assert source["channel"] == "billing" and "Postgres 16" in source["text"]
    assert source["permalink"] == f"https://acme.slack.com/archives/CBILLING/p{f'{T0:.6f}'.replace('.', '')}"


def test_a_reply_that_ignores_what_memory_found_shows_no_source(postgres_adapter, tiny_model):
    """Memory finds her deploy message, but the reply says something else: nothing backs it."""
    result = chat(postgres_adapter, tiny_model, "--once", "when do deploys go out on Jenkins?", "--json")
    answer = json.loads(result.stdout)
    assert answer["abstained"] is False and "Postgres" in answer["reply"]
    assert answer["sources"] == []


def test_the_terminal_chat_shows_where_a_reply_s_source_was_said(postgres_adapter, tiny_model):
    result = chat(
        postgres_adapter,
        tiny_model,
        "--workspace-url",
        "https://acme.slack.com",
        stdin="which database does billing use?\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    link = f"https://acme.slack.com/archives/CBILLING/p{f'{T0:.6f}'.replace('.', '')}"
    assert f"from #billing, 12 Mar 2025: {link}" in result.stdout


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
