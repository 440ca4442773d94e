"""Abstention's measure and the held-out definitions behind eval.json's memory figures: a question about the
person's own subjects has support, one of another workspace or language has none; Japanese is indexed by
character pairs; a held-out question has a basis when the real reply shares specific terms with an earlier
message, and a reply contains the answer when it holds one of them."""

from __future__ import annotations

import pytest
import Stemmer

from doppel.memory.heldout import Earlier, asked, contains_answer, foreign_questions, memory_holds_answer
from doppel.memory.index import MemoryIndex, entries_from_samples, terms, write_index
from doppel.memory.prompt import MemorySettings
from doppel.memory.support import clean
from doppel.slack.conversation import system_prompt

T0 = 1_741_780_800.0
TOPICS = [
    "the chaincode container failed to start because the peer could not reach the docker daemon",
    "endorsement policy needs two orgs to sign before the orderer accepts the transaction",
    "rebuild the peer image with make peer-docker, then restart the network with the new chaincode",
    "the orderer uses kafka for consensus, raft is coming in the next release",
    "ledger state lives in couchdb when you want rich queries on the chaincode data",
    "gossip between peers distributes blocks within the org, the anchor peer talks to other orgs",
]
JAPANESE = [
    "コネクションプールはManagerが保持しています",
    "型クラスの定義を確認してください",
    "スタックでビルドするときはresolverを固定するとよいです",
]


def record(text: str, i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": system_prompt("Gari")},
            {"role": "user", "content": "Kim: any idea?"},
            {"role": "assistant", "content": text},
        ],
        "meta": {"team": "T1", "channel": "fabric", "channel_id": "CF", "ts": f"{T0 + i:.6f}", "user": "U1",
                 "person": "Gari"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> MemoryIndex:
    # A person who has written a lot (about 15,000 words) about a few subjects, and a little in Japanese.
    texts = [f"{TOPICS[i % len(TOPICS)]} ({i})" for i in range(1200)] + JAPANESE * 5
    where = tmp_path_factory.mktemp("memory") / "memory"
    write_index(entries_from_samples([record(t, i) for i, t in enumerate(texts)]), where, team="T1",
                person_id="U1", person_name="Gari")  # fmt: skip
    return MemoryIndex.load(where)


def test_the_persons_subjects_have_support_and_another_workspaces_do_not(index):
    own = index.search("why does the chaincode container fail to reach the peer?")
    assert own.support > 0 and not own.abstain and own.hits
    foreign = index.search("who should approve the quarterly billing roadmap before the offsite?")
    assert foreign.support < -0.5 and foreign.abstain
    other_language = index.search("Haskellの型推論について質問があります、GHCの拡張は？")
    assert other_language.abstain


def test_chit_chat_and_follow_ups_are_never_abstained_on(index):
    assert not index.search("thanks, have a nice weekend").abstain  # not a question
    follow_up = index.search("and the cli?")
    assert follow_up.support is None and not follow_up.abstain


def test_the_threshold_is_configurable(index):
    question = "who should approve the quarterly billing roadmap before the offsite?"
    assert index.search(question).abstain
    assert not index.search(question, min_support=-9).abstain
    settings = MemorySettings.from_env({"DOPPEL_MEMORY_MIN_SUPPORT": "-9"})
    assert settings.min_support == -9


def test_slack_markup_says_nothing_of_the_subject():
    assert clean("<@U0KIM> see <https://x.io/a|this> :eyes: ok").split() == ["see", "ok"]


def test_japanese_is_indexed_by_character_pairs_cut_at_hiragana(index):
    stemmer = Stemmer.Stemmer("english")
    assert terms("コネクションプールが保持", stemmer) == [
        "コネ",
        "ネク",
        "クシ",
        "ショ",
        "ョン",
        "ンプ",
        "プー",
        "ール",
        "保持",
    ]
    recall = index.search("コネクションプールはどこで保持されますか？")
    assert recall.hits and "コネクションプール" in recall.hits[0].entry.text and not recall.abstain


def test_a_held_out_question_has_a_basis_when_the_real_reply_shares_specific_terms_with_an_earlier_one():
    stemmer = Stemmer.Stemmer("english")
    said = ["the fix is to pin protobuf to 3.19 in the vendored deps"]
    earlier = Earlier([*said, *(f"thanks, looks good {i}" for i in range(400))], stemmer)
    basis = earlier.basis(
        "why does the build break on the generated code?", "pin protobuf, as I said: 3.19 works"
    )
    assert basis is not None and set(basis.answer) >= {"protobuf", "pin"}
    assert contains_answer("I think you need to pin it", basis, stemmer)
    assert not contains_answer("no idea, sorry", basis, stemmer)
    # Repeating the question's words is no answer; a word used all the time says nothing.
    assert earlier.basis("should we pin protobuf?", "pin protobuf, yes") is None
    assert earlier.basis("what do you think of it all?", "thanks, looks good") is None


def test_the_answer_counts_as_retrieved_only_when_the_memory_lines_hold_it():
    stemmer = Stemmer.Stemmer("english")
    earlier = Earlier(
        ["the fix is to pin protobuf to 3.19", *(f"thanks, looks good {i}" for i in range(400))], stemmer
    )
    basis = earlier.basis("why does the build break on the generated code?", "pin protobuf: 3.19 works")
    assert basis is not None
    question = {"role": "user", "content": "Bob: why does the build break on the generated code?"}
    remembered = [
        {
            "role": "system",
            "content": system_prompt("Alice", memory=["[#dev, 3 Mar] the fix is to pin protobuf"]),
        },
        question,
    ]
    assert memory_holds_answer(remembered, basis, stemmer)
    # Memory that misses it, or none at all, does not count, even when the conversation holds the answer.
    elsewhere = {"role": "user", "content": "Bob: pin protobuf? why does the build break on generated code?"}
    missed = [
        {"role": "system", "content": system_prompt("Alice", memory=["[#dev, 3 Mar] lunch at noon"])},
        elsewhere,
    ]
    assert not memory_holds_answer(missed, basis, stemmer)
    assert not memory_holds_answer(
        [{"role": "system", "content": system_prompt("Alice")}, elsewhere], basis, stemmer
    )


def test_the_question_a_sample_answered_and_another_workspaces_questions():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "Kim: hi\nKim: is the peer up?"},
        {"role": "assistant", "content": "yes"},
    ]
    assert asked(messages) == "is the peer up?"
    assert asked([*messages[:1], {"role": "user", "content": "Kim: done."}, messages[2]]) is None
    assert len(foreign_questions("T1")) > 20 and foreign_questions("T0DEMO0001") == []
