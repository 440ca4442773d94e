"""The person's message index: built from samples, searched under a budget, abstaining on what the messages
do not cover, never read across doppels or workspaces, and gone with the doppel's directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from doppel.cli import main
from doppel.errors import BadInput
from doppel.memory.index import MemoryIndex, entries_from_samples, person_entries, tokens, write_index
from doppel.memory.voice import abstention
from doppel.slack.conversation import system_prompt

T0 = 1_741_780_800.0  # 12 Mar 2025, 12:00 UTC


def sample(text: str, answered: str, channel: str, ts: float, thread_ts: float | None = None) -> dict:
    """A samples.jsonl record as `doppel scrape` writes it."""
    return {
        "messages": [
            {"role": "system", "content": system_prompt("Alice Smith")},
            {"role": "user", "content": answered},
            {"role": "assistant", "content": text},
        ],
        "meta": {
            "team": "T1",
            "channel": channel,
            "channel_id": f"C{channel.upper()}",
            "thread_ts": f"{thread_ts or ts:.6f}",
            "ts": f"{ts:.6f}",
            "user": "U1",
            "person": "Alice Smith",
        },
    }


RECORDS = [
    sample(
        "Billing runs on Postgres 16, the invoices table is partitioned by month.",
        "Bob: which database does billing use?",
        "billing",
        T0,
    ),
    sample(
        "The deploy pipeline runs on Jenkins every night at 2am, and the canary gets an hour.",
        "Carol: when do deploys go out?",
        "ops",
        T0 + 3600,
    ),
    sample("I'd rather we keep the retry budget at three attempts.", "Dan: retries?", "ops", T0 + 7200),
    sample(
        "Lunch was great, the ramen place near the office is back.", "Bob: how was lunch", "random", T0 + 9000
    ),
    *[
        sample(f"Standup {i}: reviewed pull requests, fixed flaky tests.", "Eve: status?", "team", T0 + i)
        for i in range(20, 35)
    ],
    *[
        sample(f"Coffee order {i}: a flat white and a croissant.", "Finn: coffee?", "random", T0 + i)
        for i in range(40, 75)
    ],
]


def alice_index(where: Path) -> MemoryIndex:
    """Alice's index of RECORDS, written to `where` and loaded as her doppel loads it."""
    entries = entries_from_samples(RECORDS)
    write_index(entries, where, team="T1", person_id="U1", person_name="Alice Smith")
    return MemoryIndex.load(where, team="T1", person_id="U1")


@pytest.fixture
def index(tmp_path: Path) -> MemoryIndex:
    return alice_index(tmp_path / "memory")


def test_a_question_the_person_answered_before_finds_their_message_with_its_source(index):
    recall = index.search("Hey Alice, what database is billing on?")
    assert not recall.abstain
    best = recall.hits[0].entry
    assert "Postgres 16" in best.text
    assert best.answered == "Bob: which database does billing use?"
    source = recall.sources("https://acme.slack.com/")[0]
    assert source == {
        "channel": "billing",
        "ts": f"{T0:.6f}",
        "permalink": f"https://acme.slack.com/archives/CBILLING/p{f'{T0:.6f}'.replace('.', '')}",
        "text": best.text,
    }
    # The prompt line says where and when, and what the message answered.
    assert recall.lines()[0].startswith("[#billing, 12 Mar 2025] (answering Bob: which database")


def test_a_reply_in_a_thread_links_to_its_thread():
    entry = entries_from_samples([sample("yes", "Bob: ok?", "ops", T0 + 30, thread_ts=T0)])[0]
    link = entry.source("https://acme.slack.com")["permalink"]
    assert link.endswith(f"?thread_ts={T0:.6f}&cid=COPS")


def test_a_question_the_messages_do_not_cover_abstains_and_chit_chat_does_not(index):
    uncovered = index.search("What is our policy on GDPR data retention for EU customers?")
    assert uncovered.abstain and not uncovered.hits
    assert uncovered.coverage < 0.3
    chat = index.search("thanks, have a nice weekend")
    assert not chat.abstain


def test_the_abstention_names_the_person_without_a_mention_and_follows_their_habits():
    plain = abstention("Alice Smith")
    assert "Alice Smith" in plain and "<@" not in plain and plain.endswith(".")
    casual = abstention("@alice", {"lowercase": 0.9, "full_stop": 0.1})
    assert casual[0].islower() and not casual.endswith(".") and "@" not in casual


def test_the_thresholds_are_configurable(index):
    query = "how long does the canary get after deploys?"
    assert index.search(query).hits
    assert not index.search(query, min_coverage=0.99).hits  # the messages used
    assert index.search(query, min_support=9).abstain  # the questions abstained on


def test_retrieved_lines_stay_within_the_token_budget(index):
    query = "standup pull requests flaky tests"
    wide = index.search(query, k=10, budget_tokens=10_000)
    assert len(wide.hits) == 10
    for budget in (30, 60, 100):
        narrow = index.search(query, k=10, budget_tokens=budget)
        assert sum(tokens(line) for line in narrow.lines()) <= budget
        assert len(narrow.hits) < len(wide.hits)


def test_the_budget_holds_in_real_tokens_for_japanese_as_for_english(tmp_path, smollm2_model):
    # Counted in characters, Japanese memory took three times its share of a 512-token prompt (a character
    # is about a token for SmolLM2, not a third of one) and crowded out the conversation it answers.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    said = {
        "en": ("The deploy pipeline runs the flaky integration tests twice before paging.", "Lunch at noon."),
        "ja": ("デプロイのパイプラインでは不安定な結合テストを二回実行します。", "お昼ご飯は十二時です。"),
    }
    for language, (text, other) in said.items():
        records = [sample(f"{text} ({i})", "Bob: how?", "general", T0 + i) for i in range(10)]
        records += [sample(f"{other} ({i})", "Bob: lunch?", "random", T0 + 100 + i) for i in range(30)]
        entries = entries_from_samples(records)
        where = write_index(entries, tmp_path / language, team="T1", person_id="U1", person_name="A")
        recall = MemoryIndex.load(where).search(text, k=10, budget_tokens=128, min_support=-99)
        assert recall.hits, language
        real = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in recall.lines())
        assert real <= 128 * 1.25, (language, real)


def test_training_retrieval_sees_neither_the_thread_being_trained_nor_anything_newer(index):
    billing = entries_from_samples(RECORDS[:1])[0]
    recall = index.search("which database does billing use?", before_ts=T0 + 1, exclude_thread=billing.thread)
    assert all(hit.entry.thread != billing.thread for hit in recall.hits)
    later = index.search("deploy pipeline jenkins", before_ts=T0 + 3600)
    assert later.hits == []  # the only such message is not older than the sample


def test_another_doppel_or_workspace_cannot_read_the_index(index):
    with pytest.raises(BadInput, match="person_id 'U1', not 'U2'"):
        MemoryIndex.load(index.where, team="T1", person_id="U2")
    with pytest.raises(BadInput, match="team 'T1', not 'T2'"):
        MemoryIndex.load(index.where, team="T2", person_id="U1")


def test_messages_of_another_workspace_never_join_an_index(tmp_path):
    other = sample("secret plans", "Zed: plans?", "x", T0)
    other["meta"]["team"] = "T2"
    with pytest.raises(BadInput, match="workspace T2"):
        write_index(
            entries_from_samples([RECORDS[0], other]),
            tmp_path / "memory",
            team="T1",
            person_id="U1",
            person_name="Alice",
        )
    assert not (tmp_path / "memory").exists()


def test_a_rebuild_replaces_the_index_whole(tmp_path, index):
    where = index.where
    write_index(entries_from_samples(RECORDS[:2]), where, team="T1", person_id="U1", person_name="Alice")
    again = MemoryIndex.load(where)
    assert len(again.entries) == 2
    assert json.loads((where / "memory.json").read_text())["entries"] == 2
    assert [p.name for p in where.parent.iterdir()] == ["memory"]  # no temporary directory left


def test_forget_removes_the_index_with_the_adapter_and_leaves_other_doppels(tmp_path):
    """The cleanup command the operator's purge Job runs for `/doppel forget`, on a real directory tree."""
    root = tmp_path / "data"
    alice = root / "doppel-t1" / "alice"
    bob = root / "doppel-t1" / "bob"
    for user_dir, person in ((alice, "U1"), (bob, "U2")):
        write_index(
            entries_from_samples(RECORDS[:3]),
            user_dir / "adapters" / "v1" / "memory",
            team="T1",
            person_id=person,
            person_name=person,
        )
    result = CliRunner().invoke(main, ["cleanup", "--data-root", str(root), str(alice)])
    assert result.exit_code == 0, result.output
    assert not alice.exists()
    assert MemoryIndex.load(bob / "adapters" / "v1" / "memory", person_id="U2").entries


def test_memory_holds_the_scrapes_messages_and_the_samples_it_lacks(tmp_path):
    short = {
        "text": "Postgres 16, partitioned by month.",
        "channel": "billing",
        "channel_id": "CBILLING",
        "ts": f"{T0 - 60:.6f}",
        "thread_ts": f"{T0 - 60:.6f}",
        "team": "T1",
        "answered": "Bob: db?",
    }
    memory = tmp_path / "memory.jsonl"
    memory.write_text(json.dumps(short) + "\n")
    entries = person_entries(RECORDS[:2], memory)
    assert [e.text for e in entries] == [short["text"], *(r["messages"][-1]["content"] for r in RECORDS[:2])]
    # The same message in both is kept once, as the scrape's memory has it.
    memory.write_text(memory.read_text() + json.dumps({**short, "ts": RECORDS[0]["meta"]["ts"]}) + "\n")
    assert len(person_entries(RECORDS[:2], memory)) == 3
    assert person_entries(RECORDS[:2], tmp_path / "absent.jsonl") == entries_from_samples(RECORDS[:2])


def test_a_malformed_memory_file_is_refused_in_one_line(tmp_path):
    memory = tmp_path / "memory.jsonl"
    memory.write_text('{"text": "hi"}\n')
    with pytest.raises(BadInput, match=r"memory.jsonl:1: not a memory entry"):
        person_entries(RECORDS, memory)
