"""Which remembered messages a reply drew on: the sources it shows.

Retrieval puts the person's best matching messages in the prompt whether or not the model then uses them,
and a small model often does not (docs/memory.md: SmolLM2's replies on the real exports seldom carry what
memory gave them). A source shown under a reply that says something else passes an invention off as
grounded, so a reply shows only the messages it *draws on*: it repeats something of the message that the
conversation did not already say, namely

- one of its links, or
- one of its rare words (under `RARE_ZIPF` in general language, wordfreq's lists: a name, a tool, a
  number: "postgres", "jenkins", "5427"), or
- two of its less common words (under `COMMON_ZIPF`: "database", "pipeline"; everyday words such as
  "think" or "today" never count).

Words are compared as the index compares them (stemmed, stop words and the person's own name out; CJK text
as character pairs), so "parsers" in a reply repeats "parser" of a message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import Stemmer

from doppel.memory.index import MemoryIndex, Recall, content_words, terms
from doppel.memory.support import background
from doppel.slack.conversation import memory_of

RARE_ZIPF = 3.5  # a word under it (about once in 300,000 words of general language) is specific alone
COMMON_ZIPF = 5.0  # a word at or above it (once in 10,000) is everyday language: never evidence
_LINK = re.compile(r"https?://[^\s<>|]+", re.IGNORECASE)
_WHERE = re.compile(r"^\[[^\]]*\]\s*")  # a memory line's "[#channel, day] "


def drawn_on(index: MemoryIndex, recall: Recall, reply: str, conversation: Iterable[str]) -> Recall:
    """`recall` with only the hits `reply` draws on; the rest of the recall (abstention, support) as is."""
    if not recall.hits:
        return recall
    drawn = _drawing_on(reply, list(conversation), index.stemmer, index.name_terms)
    return replace(recall, hits=[h for h in recall.hits if drawn(h.entry.text)])


def draws_on(
    reply: str, source: str, conversation: Sequence[str], stemmer: Any, *, exclude: Iterable[str] = ()
) -> bool:
    """Whether `reply` repeats something of `source` that `conversation` did not say (see the module)."""
    return _drawing_on(reply, conversation, stemmer, exclude)(source)


def memory_use(
    prompts: Sequence[Sequence[Mapping[str, str]]], replies: Mapping[str, Sequence[str]], person: str
) -> dict[str, Any] | None:
    """Of the replies to `prompts` whose system prompt holds memory, the share that draw on it, for each
    set of `replies` (one reply per prompt): how often the model uses what retrieval gave it, against how
    often the person's real replies repeat it. None when no prompt holds memory."""
    stemmer = Stemmer.Stemmer("english")
    name = terms(person, stemmer)
    with_memory = []
    for i, prompt in enumerate(prompts):
        system = prompt[0]["content"] if prompt and prompt[0].get("role") == "system" else ""
        lines = [_WHERE.sub("", line) for line in memory_of(system).splitlines() if line.strip()]
        if lines:
            with_memory.append((i, lines, [m["content"] for m in prompt[1:]]))
    if not with_memory:
        return None
    shares: dict[str, Any] = {}
    for key, texts in replies.items():
        drew = [any(map(_drawing_on(texts[i], said, stemmer, name), lines)) for i, lines, said in with_memory]
        shares[key] = round(sum(drew) / len(drew), 4)
    return {**shares, "replies": len(with_memory)}


def _drawing_on(
    reply: str, conversation: Sequence[str], stemmer: Any, exclude: Iterable[str]
) -> Callable[[str], bool]:
    """The test of whether `reply` draws on a message, with what the reply and the conversation say taken
    apart once for all the messages it is put to."""
    links = _links(reply) - set().union(*map(_links, conversation))
    known = set(exclude).union(*(_zipfs(text, stemmer) for text in conversation))
    written = {term: zipf for term, zipf in _zipfs(reply, stemmer).items() if term not in known}

    def drawn(source: str) -> bool:
        if links & _links(source):
            return True
        shared = [written[term] for term in _zipfs(source, stemmer).keys() & written.keys()]
        return any(z < RARE_ZIPF for z in shared) or sum(z < COMMON_ZIPF for z in shared) >= 2

    return drawn


def _links(text: str) -> set[str]:
    return {link.rstrip(".,;:!?)'\"").rstrip("/").lower() for link in _LINK.findall(text)}


def _zipfs(text: str, stemmer: Any) -> dict[str, float]:
    """Each index term of `text`, with the general-language zipf frequency of its rarest form."""
    zipfs: dict[str, float] = {}
    for word, term, cjk in content_words(text, stemmer):
        zipf = math.log10(background(word, cjk)) + 9
        zipfs[term] = min(zipf, zipfs.get(term, zipf))
    return zipfs
