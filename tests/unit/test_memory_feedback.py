"""Feedback and corrections: stored per doppel in its data directory, read back as weighted training samples
and preference pairs, gone with the doppel, never seen by another."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from doppel.cli import main
from doppel.errors import BadInput
from doppel.memory.feedback import CORRECTION_WEIGHT, FeedbackStore
from doppel.train.data import load_samples, weighted

PROMPT = [
    {"role": "system", "content": "You are Alice, chatting with colleagues on Slack."},
    {"role": "user", "content": "Bob: are we shipping friday?"},
]


def test_votes_count_once_per_person_and_reply_and_a_second_click_replaces_the_first(tmp_path):
    store = FeedbackStore(tmp_path / "alice")
    store.record_reply("1700000000.000100", messages=PROMPT, reply="Yes! Cheers, Alice")
    store.vote("1700000000.000100", "U2", "up")
    store.vote("1700000000.000100", "U3", "up")
    store.vote("1700000000.000100", "U2", "down")  # Bob changed his mind
    counts = store.counts()
    assert (counts.replies, counts.up, counts.down, counts.corrections) == (1, 1, 1, 0)


def test_a_correction_becomes_a_weighted_sample_and_a_preference_pair(tmp_path):
    store = FeedbackStore(tmp_path / "alice")
    store.record_reply("1700000000.000100", messages=PROMPT, reply="Yes! Cheers, Alice")
    store.correct("1700000000.000100", "U1", "first draft")
    store.correct("1700000000.000100", "U1", "yes, friday")  # the latest correction wins
    assert store.counts().corrections == 1
    [sample] = store.training_samples(person="Alice")
    assert sample["messages"] == [*PROMPT, {"role": "assistant", "content": "yes, friday"}]
    assert sample["meta"]["weight"] == CORRECTION_WEIGHT
    assert store.preference_pairs() == [
        {
            "prompt": PROMPT,
            "chosen": [{"role": "assistant", "content": "yes, friday"}],
            "rejected": [{"role": "assistant", "content": "Yes! Cheers, Alice"}],
        }
    ]


def test_a_correction_of_an_unknown_reply_or_identical_to_it_teaches_nothing(tmp_path):
    store = FeedbackStore(tmp_path / "alice")
    store.correct("1700000000.000999", "U1", "no context for this one")
    store.record_reply("1700000000.000100", messages=PROMPT, reply="yes, friday")
    store.correct("1700000000.000100", "U1", "yes, friday")
    assert len(store.training_samples()) == 1  # the known reply's
    assert store.preference_pairs() == []


def test_keys_cannot_escape_the_doppels_directory(tmp_path):
    store = FeedbackStore(tmp_path / "alice")
    for key in ("../bob/x", "a/b", ""):
        with pytest.raises(ValueError):
            store.vote(key, "U2", "up")
    with pytest.raises(ValueError):
        store.vote("1700000000.000100", "U2", "sideways")  # type: ignore[arg-type]


def test_one_doppels_feedback_is_invisible_to_another_and_goes_with_forget(tmp_path):
    root = tmp_path / "data"
    alice, bob = FeedbackStore(root / "ns" / "alice"), FeedbackStore(root / "ns" / "bob")
    alice.record_reply("1700000000.000100", messages=PROMPT, reply="hi")
    alice.correct("1700000000.000100", "U1", "hello")
    alice.vote("1700000000.000100", "U2", "down")
    assert bob.counts().replies == bob.counts().down == 0 and bob.training_samples() == []
    result = CliRunner().invoke(main, ["cleanup", "--data-root", str(root), str(root / "ns" / "alice")])
    assert result.exit_code == 0, result.output
    assert alice.counts().corrections == 0 and not (root / "ns" / "alice").exists()


def test_corrections_are_trained_on_more_often_than_ordinary_messages(tmp_path):
    store = FeedbackStore(tmp_path / "alice")
    store.record_reply("1700000000.000100", messages=PROMPT, reply="Yes! Cheers, Alice")
    store.correct("1700000000.000100", "U1", "yes, friday")
    ordinary = {"messages": [*PROMPT, {"role": "assistant", "content": "sure"}], "meta": {"thread_ts": "1"}}
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in [ordinary, *store.training_samples()]))
    samples = load_samples(path)
    assert [s.weight for s in samples] == [1, CORRECTION_WEIGHT]
    from doppel.train.data import Encoded

    items = [Encoded([1], [1], s.thread, s.weight) for s in samples]
    assert [item.weight for item in weighted(items)] == [1] + [CORRECTION_WEIGHT] * CORRECTION_WEIGHT


@pytest.mark.parametrize("weight", [0, 11, 1.5, "3", True])
def test_a_bad_weight_is_refused_with_its_line(tmp_path, weight):
    path = tmp_path / "samples.jsonl"
    bad = {"messages": [*PROMPT, {"role": "assistant", "content": "x"}], "meta": {"weight": weight}}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(BadInput, match=r"samples.jsonl:1: meta.weight"):
        load_samples(path)


def test_corrected_contexts_closer_to_the_correction_is_counted_per_context():
    from doppel.train.learning import closer_share, similarity, table_line

    corrections = ["Ship it on Friday.", "Let's review the plan."]
    before = ["Ship it on Friday.\nKind regards, Margaret", "Let's review the plan.\nKind regards, Margaret"]
    after = ["Ship it on Friday.", "Let's review the plan.\nKind regards, Margaret"]  # one learnt, one same
    figures = closer_share(corrections, before, after)
    assert figures["contexts"] == 2 and figures["closer"] == 0.5  # a tie is not closer
    assert figures["similarity_after"] > figures["similarity_before"]
    assert similarity("A  b", "a b") == 1.0
    assert "50% of 2" in table_line(figures) and table_line(None) is None


def test_the_corrections_come_with_the_context_they_corrected(tmp_path):
    store = FeedbackStore(tmp_path)
    store.record_reply("1700000000.000100", messages=[{"role": "user", "content": "Bob: ok?"}], reply="Yes.")
    store.correct("1700000000.000100", "U1", "Yes, ship it.")
    assert store.corrections() == [
        {
            "reply_ts": "1700000000.000100",
            "messages": [{"role": "user", "content": "Bob: ok?"}],
            "reply": "Yes.",
            "text": "Yes, ship it.",
        }
    ]


def test_what_training_reads_of_a_correction_is_scrubbed_unless_the_doppel_is_not(tmp_path):
    """Alice corrects her doppel with a connection string, her email and her phone number, as people do in
    the "Correct this" modal: the sample and the preference pair the next training reads hold placeholders
    (the scrape's scrubber), a doppel made with `--no-scrub` gets her words as she wrote them."""
    words = (
        "use postgres://admin:Hunter2Staging@db.staging.example.com/app "
        "or mail me at alice.martin@example.com, cell 415-555-0132"
    )
    clean = "use postgres://admin:<secret>@db.staging.example.com/app or mail me at <email>, cell <phone>"
    asked = [*PROMPT[:1], {"role": "user", "content": "Bob: how do I reach staging? I am bob@example.com"}]
    store = FeedbackStore(tmp_path / "alice")
    store.record_reply("1700000000.000100", messages=asked, reply="ask ops, token xoxc-1234567890-abcdef12")
    store.correct("1700000000.000100", "U0ALICE001", words)
    [sample] = store.training_samples(person="Alice")
    assert sample["messages"][-1] == {"role": "assistant", "content": clean}
    assert sample["messages"][1]["content"] == "Bob: how do I reach staging? I am <email>"
    [pair] = store.preference_pairs()
    assert (
        pair["chosen"][0]["content"] == clean and pair["rejected"][0]["content"] == "ask ops, token <secret>"
    )
    trained = json.dumps([store.training_samples(), store.preference_pairs(), store.corrections()])
    for secret in ("Hunter2Staging", "alice.martin@", "555-0132", "bob@example.com", "xoxc-"):
        assert secret not in trained
    raw = FeedbackStore(tmp_path / "alice", scrub=False)
    assert raw.training_samples()[0]["messages"][-1]["content"] == words
