"""Held-out questions with a basis in the person's earlier messages, and their answers: the definitions
behind eval.json's memory figures (`doppel.train.memory_eval`) and bench_memory's abstention rates.

A held-out question (a message the person answered after the training's cut) *has a basis* when the
person's real reply shares at least `BASIS_TERMS` specific terms with one message they wrote before the
cut. Specific: not in the question itself (repeating the question is no answer) and in at most
`SPECIFIC_SHARE` of their earlier messages (a word they use all the time, "thanks" or their project's
name, says nothing). Those shared terms are *the answer*; a generated reply *contains it* when it holds at
least one of them. Questions of fewer than two content words ("any idea?", "from cli?") are left out: they
ask about the thread, not a subject, and are never abstained on (`doppel.memory.support`).

A question *has no basis* when it comes from another workspace (`foreign_questions`: the demo workspace's,
for a person of any other workspace).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from doppel.memory.index import is_question, terms
from doppel.memory.support import MIN_WORDS, clean
from doppel.slack.conversation import memory_of, speaker

BASIS_TERMS = 2
SPECIFIC_SHARE = 0.005  # of the person's earlier messages, at least MIN_SPECIFIC of them
MIN_SPECIFIC = 2


@dataclass(frozen=True)
class Basis:
    question: str
    reply: str  # the person's real reply
    answer: tuple[str, ...]  # the specific terms it shares with one earlier message of theirs


class Earlier:
    """The person's messages before the cut, as term sets, to find the basis of held-out questions."""

    def __init__(self, texts: Iterable[str], stemmer: Any) -> None:
        self.stemmer = stemmer
        self.messages = [set(terms(clean(t), stemmer)) for t in texts]
        self.df: Counter[str] = Counter(t for m in self.messages for t in m)
        self.postings: dict[str, list[int]] = defaultdict(list)
        for i, message in enumerate(self.messages):
            for term in message:
                self.postings[term].append(i)
        self.specific = max(MIN_SPECIFIC, int(len(self.messages) * SPECIFIC_SHARE))

    def basis(self, question: str, reply: str) -> Basis | None:
        """The basis of `question` answered by `reply`, or None."""
        asked = set(terms(clean(question), self.stemmer))
        if len(asked) < MIN_WORDS:
            return None
        said = {t for t in set(terms(clean(reply), self.stemmer)) - asked if 0 < self.df[t] <= self.specific}
        shared = Counter(i for t in said for i in self.postings[t])
        if not shared:
            return None
        best, count = min(shared.items(), key=lambda item: (-item[1], item[0]))
        if count < BASIS_TERMS:
            return None
        return Basis(question, reply, tuple(sorted(said & self.messages[best])))


def contains_answer(reply: str, basis: Basis, stemmer: Any) -> bool:
    """Whether `reply` holds at least one term of the answer."""
    return bool(set(terms(clean(reply), stemmer)) & set(basis.answer))


def memory_holds_answer(prompt: Sequence[dict[str, str]], basis: Basis, stemmer: Any) -> bool:
    """Whether the memory in `prompt`'s system prompt holds at least one term of the answer: what retrieval
    put within the model's reach (the conversation itself does not count)."""
    system = prompt[0]["content"] if prompt and prompt[0].get("role") == "system" else ""
    return contains_answer(memory_of(system), basis, stemmer)


def asked(sample_messages: Sequence[dict[str, str]]) -> str | None:
    """The question a sample's reply answered (the last line of the user turn before it, without its
    author), or None when that is not a question."""
    if len(sample_messages) < 3 or sample_messages[-2].get("role") != "user":
        return None
    line = sample_messages[-2]["content"].splitlines()[-1] if sample_messages[-2]["content"] else ""
    line = speaker(line)[1]  # "Name: text", as build_conversation writes
    return line if is_question(line) else None


def foreign_questions(team: str) -> list[str]:
    """Questions of another workspace: the demo's, unless `team` is the demo's (then none)."""
    from doppel.demo.workspace import TEAM_ID, build_workspace

    if team == TEAM_ID:
        return []
    found = [
        m.get("text", "")
        for name, content in build_workspace().items()
        if "/" in name
        for m in content
        if isinstance(m, dict) and is_question(m.get("text", ""))
    ]
    return list(dict.fromkeys(found))
