"""Whom a generated reply may address: never the person themself, only someone in the conversation.

Every generation path (the bot, `doppel chat`, `doppel local`'s replies, the fidelity report) sends the
model a conversation built by `doppel.slack.conversation.build_conversation`: a system prompt naming the
person ("You are NAME, …") and user lines prefixed with their author's name ("Bob: …"). From it,
`Addressing.of(messages)` reads the person's name and the context's speakers; then

- `banned_words()`: the words generation must not produce (`@NAME`, `NAME:`): vLLM's `bad_words`, and
  transformers' `bad_words_ids` through `banned_token_ids`, so the model never writes them;
- `repair(reply)`: what a constraint cannot express, on the finished text: an opening `@someone` who is not
  among the speakers (an invented addressee) becomes the latest speaker; an opening that addresses the
  person (`@NAME`, `NAME:`), should one get through, is dropped;
- `repair_stream(pieces)`: the same on a stream, holding back only what could still be an addressee.

Pure string logic apart from the tokenizer handed to `banned_token_ids`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The system prompt's opening as `system_prompt` and the persona prompt write it.
_PERSON = re.compile(r"^You are (?P<name>[^,\n]{1,80}), chatting")
# A user line's author prefix as `build_conversation` writes it.
_SPEAKER = re.compile(r"^(?P<name>[^:\n]{1,60}): ", re.M)
_MENTION = re.compile(r"^(?P<lead>\s*)@(?P<word>[\w.\-]+)")
_HANDLE = re.compile(r"^(?P<lead>\s*)(?P<word>[\w.\- ]{1,60}):\s*")
_SEPARATOR = re.compile(r"^[\s,:;.\-–]*")
# A stream holds back an opening mention this long at most while it is being written.
_LONGEST_MENTION = 80


@dataclass(frozen=True)
class Addressing:
    """The person a conversation asks the model to be, and the names that speak in it (latest last)."""

    person: str = ""
    speakers: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, messages: Sequence[Mapping[str, str]]) -> Addressing:
        person = ""
        speakers: list[str] = []
        for message in messages:
            content = str(message.get("content") or "")
            if message.get("role") == "system" and not person:
                match = _PERSON.match(content)
                person = match["name"].strip() if match else ""
            elif message.get("role") == "user":
                speakers += [m["name"].strip() for m in _SPEAKER.finditer(content)]
        others = [s for s in speakers if s.casefold() != person.casefold()]
        # Latest last, each once.
        ordered = list(dict.fromkeys(reversed(others)))[::-1]
        return cls(person, tuple(ordered))

    def banned_words(self) -> list[str]:
        """What the reply must never contain: the person addressing themself."""
        if not self.person:
            return []
        names = dict.fromkeys([self.person, self.person.split()[0]])
        return [word for name in names for word in (f"@{name}", f"{name}:")]

    def _names(self) -> tuple[str, ...]:
        """The person's name and first name: how a reply would address them."""
        return tuple(dict.fromkeys([self.person, self.person.split()[0]])) if self.person else ()

    def repair(self, reply: str) -> str:
        """`reply` with its opening addressee fixed (see the module docstring); otherwise unchanged."""
        if not self.person:
            return reply
        mention = _MENTION.match(reply)
        if mention:
            lead, rest = mention["lead"], reply[mention.end("lead") + 1 :]
            own = _starts_with(rest, self._names())
            if own is None:
                if _starts_with(rest, self.speakers) is not None:
                    return reply
                if self.speakers:  # an invented addressee: the latest speaker is whom it answers
                    return f"{lead}@{self.speakers[-1]}{rest[len(mention['word']) :]}"
                own = mention["word"]
            return lead + _after_address(rest[len(own) :])
        handle = _HANDLE.match(reply)
        if handle and handle["word"].strip().casefold() in {n.casefold() for n in self._names()}:
            return handle["lead"] + _after_address(reply[handle.end() :])
        return reply

    def repair_stream(self, pieces: Iterable[str]) -> Iterator[str]:
        """`pieces` with the opening repaired, holding back only what could still turn out to be an addressee
        (an `@` and a name's length, or the start of "NAME:")."""
        opening = ""
        decided = not self.person
        for piece in pieces:
            if decided:
                yield piece
                continue
            opening += piece
            if not self._undecided(opening):
                decided = True
                fixed = self.repair(opening)
                if fixed:
                    yield fixed
        if not decided and opening:
            yield self.repair(opening)

    def _undecided(self, text: str) -> bool:
        start = text.lstrip()
        if not start:
            return True
        if "\n" in start:
            return False
        if start.startswith("@"):
            longest = max(len(n) for n in (*self.speakers, *self._names()))
            if len(start) <= longest + 2:  # the @, the name and what follows it
                return True
            # A mention still being written (`@Christ` of `@Christopher`), or followed so far by its
            # separator alone: what `repair` makes of it depends on the rest.
            mention = _MENTION.match(start)
            return (
                mention is not None
                and len(start) <= _LONGEST_MENTION
                and _SEPARATOR.fullmatch(start[mention.end() :]) is not None
            )
        return any(f"{n}: ".casefold().startswith(start.casefold()) for n in self._names())


def _starts_with(text: str, names: Iterable[str]) -> str | None:
    """The longest of `names` that `text` starts with as a whole word (case-insensitive), if any."""
    folded = text.casefold()
    found = [n for n in names if n and folded.startswith(n.casefold()) and not folded[len(n) :][:1].isalnum()]
    return max(found, key=len) if found else None


def _after_address(text: str) -> str:
    """What follows a dropped addressee: its separator gone, the first letter capitalised."""
    text = text[_SEPARATOR.match(text).end() :]  # type: ignore[union-attr]
    return text[:1].upper() + text[1:]


def banned_words(conversations: Iterable[Sequence[Mapping[str, str]]]) -> list[str]:
    """The banned words of several conversations (one generation batch), each once."""
    return list(dict.fromkeys(w for c in conversations for w in Addressing.of(c).banned_words()))


def banned_token_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """transformers' `bad_words_ids` for `words`: each as written and after a space (the two ways a
    tokenizer may split it mid-text and at the start of a reply)."""
    sequences: dict[tuple[int, ...], None] = {}
    for word in words:
        for text in (word, " " + word):
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if ids:
                sequences[ids] = None
    return [list(ids) for ids in sequences]
