"""Memory in the one prompt: served prompts carry the person's matching messages, training samples get them
from other, older conversations only, and the threshold and budget come from the environment."""

from __future__ import annotations

import pytest
from tests.unit.test_memory_index import RECORDS, T0, alice_index, sample

from doppel.errors import BadInput
from doppel.memory.index import Entry, MemoryIndex, entries_from_samples, write_index
from doppel.memory.prompt import MemorySettings, recall_for, remember_samples
from doppel.slack.conversation import MEMORY_HEADING, ThreadMessage, build_conversation, system_prompt


@pytest.fixture
def index(tmp_path) -> MemoryIndex:
    return alice_index(tmp_path / "memory")


def test_without_memory_the_prompt_is_unchanged():
    context = [ThreadMessage("U2", "Bob", "hi")]
    plain = build_conversation("Alice", "U1", context)
    assert build_conversation("Alice", "U1", context, memory=[]) == plain
    assert plain[0]["content"] == system_prompt("Alice")


def test_a_served_prompt_carries_the_persons_matching_message(index):
    context = [ThreadMessage("U2", "Bob", "which database is billing on these days?", T0 + 99_999)]
    recall = recall_for(index, context)
    messages = build_conversation("Alice Smith", "U1", context, channel="general", memory=recall.lines())
    system = messages[0]["content"]
    assert system.startswith(system_prompt("Alice Smith")) and MEMORY_HEADING in system
    assert "Postgres 16" in system
    assert messages[1:] == build_conversation("Alice Smith", "U1", context, channel="general")[1:]


def test_abstention_can_be_turned_off(index):
    context = [ThreadMessage("U2", "Bob", "what is the GDPR retention policy for EU customers?")]
    assert recall_for(index, context).abstain
    assert not recall_for(index, context, MemorySettings(abstain=False)).abstain


def test_training_samples_get_memory_from_other_older_conversations_only(index):
    later = sample(
        "Still Postgres, we moved billing to version 17 last week.",
        "Dan: is billing still on that database?",
        "billing",
        T0 + 50_000,
    )
    same_thread = sample(
        "And the replicas too.", "Bob: which database does billing use?", "billing", T0 + 5, thread_ts=T0
    )
    first = RECORDS[0]  # the billing answer itself: nothing older covers it
    records, remembered = remember_samples([first, same_thread, later], index)
    assert remembered == 1
    assert records[0] == first and records[1] == same_thread  # own thread / nothing older: no memory
    system = records[2]["messages"][0]["content"]
    assert "Postgres 16" in system  # the older message of another thread
    assert "version 17" not in system  # never the reply being trained
    assert records[2]["messages"][1:] == later["messages"][1:]


def test_a_reply_of_several_slack_messages_never_finds_its_own_first_one_in_memory(tmp_path):
    # In channel flow the person answers in two messages; the memory holds each (memory.jsonl), and the
    # sample's reply is both, timed by the last. Its conversation is never its memory; what the person wrote
    # meanwhile elsewhere may be.
    def entry(text: str, channel: str, ts: float, answered: str) -> Entry:
        return Entry(text, channel, f"C{channel.upper()}", f"{ts:.6f}", f"{ts:.6f}", "T1", answered)

    first_half = entry("Billing moves to Postgres 17 next week.", "billing", T0 + 50_000, "Dan: moving?")
    elsewhere = entry("The billing database backups run nightly.", "ops", T0 + 50_010, "Eve: backups?")
    entries = [*entries_from_samples(RECORDS), first_half, elsewhere]
    write_index(entries, tmp_path, team="T1", person_id="U1", person_name="Alice Smith")
    turn = sample(
        "Billing moves to Postgres 17 next week.\nThe replicas follow a day later.",
        "Dan: is billing moving off that database?",
        "billing",
        T0 + 50_030,
    )
    turn["meta"]["context_ts"] = f"{T0 + 49_990:.6f}"
    [record], remembered = remember_samples([turn], MemoryIndex.load(tmp_path))
    system = record["messages"][0]["content"]
    assert remembered == 1 and "Postgres 16" in system  # what she wrote before, in another thread
    assert "backups run nightly" in system  # meanwhile, in another channel
    assert "Postgres 17" not in system  # the first message of the very reply being trained


def test_a_sample_with_an_unreadable_conversation_start_still_gets_its_memory(index):
    later = sample(
        "Still Postgres, moved to 17 last week.",
        "Dan: is billing still on that database?",
        "billing",
        T0 + 50_000,
    )
    later["meta"]["context_ts"] = "yesterday"  # not a Slack timestamp: the reply's own time stands in
    [record], remembered = remember_samples([later], index)
    assert remembered == 1 and "Postgres 16" in record["messages"][0]["content"]
    assert record["messages"][1:] == later["messages"][1:]


def test_settings_from_the_environment():
    settings = MemorySettings.from_env(
        {
            "DOPPEL_MEMORY_MIN_COVERAGE": "0.5",
            "DOPPEL_MEMORY_BUDGET_TOKENS": "100",
            "DOPPEL_MEMORY_ABSTAIN": "off",
        }
    )
    assert (settings.min_coverage, settings.budget_tokens, settings.abstain) == (0.5, 100, False)
    with pytest.raises(BadInput, match="DOPPEL_MEMORY_MIN_COVERAGE"):
        MemorySettings.from_env({"DOPPEL_MEMORY_MIN_COVERAGE": "2"})
    with pytest.raises(BadInput, match="DOPPEL_MEMORY_"):
        MemorySettings.from_env({"DOPPEL_MEMORY_K": "many"})


def test_a_coverage_floor_of_0_never_brings_newer_or_unrelated_messages(index):
    """`DOPPEL_MEMORY_MIN_COVERAGE=0` takes every message that matches at all, never one that does not:
    a training sample still sees nothing newer than itself (the held-out side stays unseen), and a served
    prompt nothing that shares no word with the question."""
    settings = MemorySettings.from_env({"DOPPEL_MEMORY_MIN_COVERAGE": "0", "DOPPEL_MEMORY_ABSTAIN": "off"})
    early = sample("We ship on Thursdays for now.", "Carol: when do deploys go out?", "ops", T0 + 100)
    [record], _ = remember_samples([early], index, settings, heldout_from=T0 + 100)
    system = record["messages"][0]["content"]
    assert "Jenkins" not in system and "ramen" not in system, system  # newer; no word in common
    context = [ThreadMessage("U2", "Bob", "which database is billing on these days?", T0 + 99_999)]
    recall = recall_for(index, context, settings)
    assert "Postgres 16" in "\n".join(recall.lines())
    assert recall.hits and all(hit.coverage > 0 for hit in recall.hits)
