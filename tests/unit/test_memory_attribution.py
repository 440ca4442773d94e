"""Sources are what a reply drew on: a remembered message is shown under a reply only when the reply repeats
something of it that the conversation did not already say."""

from __future__ import annotations

import pytest
import Stemmer
from tests.unit.test_memory_index import alice_index

from doppel.memory.attribution import drawn_on, draws_on, memory_use
from doppel.memory.index import MemoryIndex
from doppel.slack.conversation import system_prompt

STEMMER = Stemmer.Stemmer("english")
BILLING = "Billing runs on Postgres 16, the invoices table is partitioned by month."
ASKED = ["Bob: which database does billing use?"]


def drew(reply: str, source: str = BILLING, conversation: list[str] = ASKED) -> bool:
    return draws_on(reply, source, conversation, STEMMER)


def test_a_rare_word_of_the_message_is_drawing_on_it():
    assert drew("we are on postgres")
    assert drew("Invoices? partitioned, yes")  # "partitioned" alone is rare enough


def test_words_the_question_already_said_are_not():
    assert not drew("billing uses a database")  # both words are the question's
    assert not drew("the billing database is fine")


def test_everyday_words_are_not_and_two_less_common_ones_are():
    assert not drew("I think it runs on the table this month")  # runs, table, month: everyday
    source = "The release notes are in the design doc, check the dashboard."
    assert not drew("check the notes", source, ["Bob: any news?"])  # one less common word
    assert drew("the dashboard and the design doc", source, ["Bob: any news?"])  # two


def test_a_shared_link_is_drawing_on_it_unless_the_conversation_posted_it():
    source = "the grammar is here: <https://github.com/acme/cci/blob/main/grammar.bnf|grammar.bnf>"
    reply = "see https://github.com/acme/cci/blob/main/grammar.bnf."
    assert drew(reply, source, ["Bob: is there a spec?"])
    assert not drew(reply, source, ["Bob: is https://github.com/acme/cci/blob/main/grammar.bnf current?"])


def test_inflections_match_and_the_person_s_name_does_not_count():
    assert draws_on("the parser handles it", "we wrote two parsers", ["Bob: status?"], STEMMER)
    name = frozenset(STEMMER.stemWords(["okafor"]))
    assert not draws_on("Okafor here", "Okafor on the rota", ["Bob: who?"], STEMMER, exclude=name)


def test_japanese_is_compared_by_character_pairs():
    assert draws_on("ビルドはカバールで", "ビルドはカバールでやっています", ["どう？"], STEMMER)
    assert not draws_on("そうですね", "ビルドはカバールでやっています", ["どう？"], STEMMER)


@pytest.fixture
def index(tmp_path) -> MemoryIndex:
    return alice_index(tmp_path / "memory")


def test_drawn_on_keeps_the_hits_the_reply_used_and_the_rest_of_the_recall(index):
    recall = index.search("which database and pipeline do billing and deploys use?", min_coverage=0.0)
    assert {h.entry.channel for h in recall.hits} >= {"billing", "ops"}
    cited = drawn_on(index, recall, "Postgres 16, I believe", ASKED)
    assert [h.entry.channel for h in cited.hits] == ["billing"]
    assert cited.question == recall.question and cited.support == recall.support
    assert drawn_on(index, recall, "no idea, sorry", ASKED).hits == []


def test_memory_use_is_the_share_of_replies_with_memory_that_draw_on_it():
    with_memory = system_prompt("Alice Smith", memory=[f"[#billing, 12 Mar] (answering Bob: db?) {BILLING}"])
    prompts = [
        [{"role": "system", "content": with_memory}, {"role": "user", "content": ASKED[0]}],
        [{"role": "system", "content": with_memory}, {"role": "user", "content": "Eve: and invoices?"}],
        [{"role": "system", "content": system_prompt("Alice Smith")}, {"role": "user", "content": "Eve: hi"}],
    ]
    replies = {
        "adapter": ["postgres", "no idea", "postgres"],
        "real": ["postgres 16", "partitioned by month", "hi"],
    }
    assert memory_use(prompts, replies, "Alice Smith") == {"adapter": 0.5, "real": 1.0, "replies": 2}
    assert memory_use(prompts[2:], {"adapter": ["x"]}, "Alice Smith") is None
