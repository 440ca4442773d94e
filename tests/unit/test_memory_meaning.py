"""Relatedness, abstention's second measure: a question far in meaning from everything the person writes
about is abstained on even when its words are common, against a threshold calibrated on the questions the
person really answered; the embedding model loads from its wheel, never the network."""

from __future__ import annotations

import pytest
import requests

from doppel.errors import BadInput
from doppel.memory import meaning
from doppel.memory.index import (
    CALIBRATION_FILE,
    EMBEDDINGS_FILE,
    MemoryIndex,
    entries_from_samples,
    write_index,
)
from doppel.memory.prompt import MemorySettings
from doppel.slack.conversation import system_prompt

T0 = 1_741_780_800.0
HOUR = 3600.0
ASKED = [
    ("why does the chaincode container fail to start on my peer?", "the peer cannot reach the docker daemon"),
    ("which consensus does the orderer use in production?", "kafka for now, raft in the next release"),
    ("how many orgs must sign before the transaction is valid?", "the endorsement policy says two of three"),
    ("where does the ledger keep its world state?", "couchdb when you need rich queries, leveldb otherwise"),
    ("how do blocks get from one peer to the others in an org?", "gossip, and anchor peers talk across orgs"),
    ("can I upgrade chaincode without restarting the network?", "install the new version, then upgrade it"),
    ("what certificate does the peer present to the orderer?", "its tls cert from the org's fabric-ca"),
    ("is the private data collection replicated to every peer?", "only to the member orgs' peers"),
]


def record(question: str, answer: str, i: int) -> dict:
    """A sample in its own thread, half a day after the previous one."""
    ts = f"{T0 + i * 12 * HOUR:.6f}"
    return {
        "messages": [
            {"role": "system", "content": system_prompt("Gari")},
            {"role": "user", "content": f"Kim: {question}"},
            {"role": "assistant", "content": f"{answer} ({i})"},
        ],
        "meta": {"team": "T1", "channel": "fabric", "channel_id": "CF", "ts": ts, "thread_ts": ts,
                 "user": "U1", "person": "Gari"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> MemoryIndex:
    records = [record(*ASKED[i % len(ASKED)], i) for i in range(48)]
    where = tmp_path_factory.mktemp("memory") / "memory"
    write_index(entries_from_samples(records), where, team="T1", person_id="U1", person_name="Gari")
    return MemoryIndex.load(where)


FOREIGN = "should the marketing team move the spring sale newsletter to next week?"
OWN = "does the orderer need raft or kafka for consensus in production?"


def test_a_question_far_from_the_persons_subjects_is_abstained_on_by_meaning(index):
    # Support off (-9): only the relatedness decides.
    foreign = index.search(FOREIGN, min_support=-9)
    assert foreign.relatedness is not None and foreign.min_relatedness is not None
    assert foreign.relatedness < foreign.min_relatedness and foreign.abstain
    own = index.search(OWN, min_support=-9)
    assert own.relatedness > own.min_relatedness and not own.abstain and own.hits
    # 0 turns it off: the same question is answered.
    off = index.search(FOREIGN, min_support=-9, min_relatedness=0)
    assert off.min_relatedness is None and not off.abstain


def test_the_threshold_is_calibrated_on_the_questions_the_person_answered(index):
    assert len(index.calibration) == 48  # every sample answered a question of two content words or more
    assert list(index.calibration) == sorted(index.calibration)
    recall = index.search(OWN, min_support=-9, min_relatedness=0.5)
    assert recall.min_relatedness == pytest.approx(float(sorted(index.calibration)[24]), abs=0.02)
    assert index.meta["calibration_questions"] == 48 and index.meta["embedding"] == meaning.MODEL


def test_chit_chat_is_never_judged(index):
    assert index.search("thanks, see you monday").relatedness is None
    assert index.search("and the cli?").relatedness is None


def test_too_few_questions_answered_leave_the_support_alone_to_decide(tmp_path):
    records = [record(*ASKED[i % len(ASKED)], i) for i in range(meaning.MIN_CALIBRATION - 1)]
    write_index(entries_from_samples(records), tmp_path / "m", team="T1", person_id="U1", person_name="Gari")
    recall = MemoryIndex.load(tmp_path / "m").search(FOREIGN, min_support=-9)
    assert recall.min_relatedness is None and not recall.abstain


def test_an_index_built_before_relatedness_still_serves(tmp_path):
    records = [record(*ASKED[i % len(ASKED)], i) for i in range(24)]
    entries = entries_from_samples(records)
    where = write_index(entries, tmp_path / "m", team="T1", person_id="U1", person_name="G")
    (where / CALIBRATION_FILE).unlink()
    (where / EMBEDDINGS_FILE).unlink()
    recall = MemoryIndex.load(where).search(OWN)
    assert recall.hits and recall.relatedness is None and not recall.abstain


def test_the_model_loads_from_its_wheel_without_the_network(monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("the embedding model tried the network")

    monkeypatch.setattr(requests, "get", offline)
    meaning.model.cache_clear()
    vectors = meaning.embed(["the orderer uses raft", "la recette de la tarte aux pommes"])
    assert vectors.shape == (2, 256)
    near = meaning.relatedness(meaning.embed(["which consensus does the orderer run?"])[0], vectors[:1])
    far = meaning.relatedness(meaning.embed(["which consensus does the orderer run?"])[0], vectors[1:])
    assert near > far


def test_the_setting_is_a_share():
    assert MemorySettings.from_env({"DOPPEL_MEMORY_MIN_RELATEDNESS": "0.2"}).min_relatedness == 0.2
    assert MemorySettings().min_relatedness == meaning.DEFAULT_MIN_RELATEDNESS
    with pytest.raises(BadInput, match="DOPPEL_MEMORY_MIN_RELATEDNESS"):
        MemorySettings.from_env({"DOPPEL_MEMORY_MIN_RELATEDNESS": "1.5"})
