"""The one rule that picks a reply's context, and the one function that turns it into chat messages.

Training samples (`doppel scrape`), the fidelity report and inference prompts (the bot, `doppel chat`,
`doppel local`) all go through here, so the model sees at serving time the shape it was trained on.

Context (`reply_context`; `serving_context` for a reply about to be written): what a message answers, the
way people reply on Slack:
- in a thread: the thread before it, the root always kept (`fit_context` pins it);
- in the channel flow: its window (`channel_window`), the channel messages before it that follow each other
  with gaps no longer than the channel's pace allows (`WindowRule.gap_for`: a few times the median gap of
  the recent messages, never under `gap_seconds` nor over `max_gap_seconds`), at most `max_messages`;
- plus, wherever it is, the message it explicitly answers (`answered_message`): the latest message of its
  addressee (`<@U…>` or "handle:" at its start, read by `doppel.slack.normalize.addressee`) or the message
  whose text it quotes (`> …`), however far back; it is pinned so the budget never drops it.

Shape (`build_conversation`):
- a system prompt naming the person (`system_prompt`; keyword arguments extend it);
- the context as user/assistant turns: the person's own messages are `assistant`, everyone else's are
  `user`; consecutive messages of one side are merged into one turn, one line per message;
- user lines are prefixed with their author's display name (`Bob: ...`) because several people share the
  user side; assistant lines are not, since a prefix would teach the model to write its own name;
- when the context does not open with someone else's message, an opening user turn says so, so that every
  conversation alternates user/assistant and starts with a user turn (some chat templates insist);
- the context is bounded by a character budget, dropping the oldest unpinned messages first;
- with `reply` given (training), the conversation ends with that assistant turn (after the person's own
  messages just before it, if any: `reply_offset` says where the reply starts, since only the reply is
  trained); without it (inference), it ends with a user turn for the model to answer.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_BUDGET_CHARS = 4000
DEFAULT_WINDOW_GAP_S = 300.0
DEFAULT_MAX_GAP_S = 6 * 3600.0
DEFAULT_WINDOW_MESSAGES = 10
MAX_SPEAKER = 40  # characters of a display name at most, where a line reads "Name: text"
MEMORY_HEADING = "Things you wrote before that may help (use them only if they answer):"
# A pause of this many median gaps ends a conversation; measured over this many recent messages.
PACE_FACTOR = 4.0
PACE_MESSAGES = 30
# A quote is matched on this many leading characters of its first line.
QUOTE_MATCH_CHARS = 40
_QUOTE_LINE = re.compile(r"^>\s?(.*)$", re.M)


@dataclass(frozen=True)
class ThreadMessage:
    """One message of a thread or channel, text already normalised (see `doppel.slack.normalize`)."""

    author_id: str
    author_name: str
    text: str
    ts: float = 0.0  # seconds since the epoch; only windows read it
    addressee: str | None = field(default=None, compare=False)  # user ID it is addressed to, if explicit


@dataclass(frozen=True)
class WindowRule:
    """How far back a channel message's context reaches."""

    gap_seconds: float = DEFAULT_WINDOW_GAP_S  # the shortest pause that may end a conversation
    max_messages: int = DEFAULT_WINDOW_MESSAGES
    max_gap_seconds: float = DEFAULT_MAX_GAP_S  # the longest pause the channel's pace may allow
    pace: bool = True  # widen the gap to the channel's pace

    def gap_for(self, messages: Sequence[ThreadMessage]) -> float:
        """The pause that ends a conversation among `messages` (oldest first): `PACE_FACTOR` median gaps
        of the last `PACE_MESSAGES`, within [gap_seconds, max_gap_seconds]."""
        recent = messages[-PACE_MESSAGES:]
        gaps = [b.ts - a.ts for a, b in itertools.pairwise(recent) if b.ts > a.ts]
        if not self.pace or len(gaps) < 3:
            return self.gap_seconds
        paced = PACE_FACTOR * statistics.median(gaps)
        return max(self.gap_seconds, min(paced, self.max_gap_seconds))


DEFAULT_WINDOW = WindowRule()


def channel_window(
    messages: Sequence[ThreadMessage], rule: WindowRule = DEFAULT_WINDOW
) -> list[ThreadMessage]:
    """The window ending with the last of `messages` (channel messages, oldest first): that message and the
    earlier ones each at most the rule's gap before the next, at most `rule.max_messages` in all."""
    if not messages:
        return []
    gap = rule.gap_for(messages[:-1])
    start = len(messages) - 1
    while (
        start > 0
        and len(messages) - start < rule.max_messages
        and messages[start].ts - messages[start - 1].ts <= gap
    ):
        start -= 1
    return list(messages[start:])


def quoted_text(text: str) -> str | None:
    """The first quoted line of `text` (`> …`), or None."""
    for match in _QUOTE_LINE.finditer(text):
        if match[1].strip():
            return match[1].strip()
    return None


def answered_message(before: Sequence[ThreadMessage], message: ThreadMessage) -> ThreadMessage | None:
    """The message `message` explicitly answers among `before` (oldest first): the latest message of its
    addressee, else the latest one holding the text it quotes; None when it says nothing of the kind."""
    if message.addressee and message.addressee != message.author_id:
        for earlier in reversed(before):
            if earlier.author_id == message.addressee:
                return earlier
    quote = quoted_text(message.text)
    if quote:
        probe = quote[:QUOTE_MATCH_CHARS]
        for earlier in reversed(before):
            if earlier.author_id != message.author_id and probe in earlier.text:
                return earlier
    return None


def reply_context(
    message: ThreadMessage,
    before: Sequence[ThreadMessage],
    rule: WindowRule = DEFAULT_WINDOW,
    *,
    thread: Sequence[ThreadMessage] | None = None,
    person_id: str = "",
    budget_chars: int = DEFAULT_BUDGET_CHARS,
) -> list[ThreadMessage]:
    """What `message` answers, oldest first, within `budget_chars`.

    `before` is the channel flow before it (oldest first); `thread` is its thread before it, root first,
    when it is a thread reply (then its context is the thread, the root pinned). In the channel flow it is
    the window before it. Either way the message it explicitly answers (`answered_message`, searched in the
    thread and the flow) is pinned in too."""
    if thread is not None:
        pinned = list(thread[:1])
        rest = list(thread[1:])
    else:
        pinned = []
        rest = channel_window([*before, message], rule)[:-1]
    answered = answered_message([*before, *(thread or [])], message)
    if answered is not None and answered not in pinned and answered not in rest:
        pinned.append(answered)
    return fit_context(pinned, rest, person_id, budget_chars)


def serving_context(
    messages: Sequence[ThreadMessage],
    person_id: str,
    *,
    in_thread: bool,
    rule: WindowRule = DEFAULT_WINDOW,
    budget_chars: int = DEFAULT_BUDGET_CHARS,
) -> list[ThreadMessage]:
    """The context a reply about to be written gets: `reply_context` of the person's reply right after the
    last of `messages` (the thread so far, or the channel's recent messages), as its training sample had."""
    now = ThreadMessage(person_id, "", "", messages[-1].ts if messages else 0.0)
    if in_thread:
        return reply_context(now, [], rule, thread=messages, person_id=person_id, budget_chars=budget_chars)
    return reply_context(now, messages, rule, person_id=person_id, budget_chars=budget_chars)


def fit_context(
    pinned: Sequence[ThreadMessage], rest: Sequence[ThreadMessage], person_id: str, budget_chars: int
) -> list[ThreadMessage]:
    """`pinned` and the newest of `rest` that fit `budget_chars` together, in time order; pinned messages
    share the budget with the rest (each clipped from the left to its share): the newest always has room."""
    kept: list[ThreadMessage] = []
    used = 0
    for message in pinned:
        clipped = _clip(message, person_id, max(budget_chars // (len(pinned) + 1), 1))
        kept.append(clipped)
        used += _cost(clipped, person_id)
    kept += _within_budget(rest, person_id, max(budget_chars - used, 0))
    return sorted(kept, key=lambda m: m.ts)


def system_prompt(person_name: str, *, memory: Sequence[str] = ()) -> str:
    """The system prompt naming the person, with `memory` (lines of their own earlier messages, best
    first: `doppel.memory`) after it."""
    prompt = (
        f"You are {person_name}, chatting with colleagues on Slack. "
        f"Reply as {person_name} would, in their tone, length and habits."
    )
    if memory:
        prompt += f"\n\n{MEMORY_HEADING}\n" + "\n".join(memory)
    return prompt


def memory_of(system: str) -> str:
    """The memory a system prompt holds (its lines after `MEMORY_HEADING`, as `system_prompt` wrote them),
    or "" when it holds none."""
    _, heading, memory = system.partition(f"\n\n{MEMORY_HEADING}\n")
    return memory if heading else ""


def opening_line(channel: str | None) -> str:
    return f"(a new thread in #{channel})" if channel else "(a new thread)"


def build_conversation(
    person_name: str,
    person_id: str,
    context: Sequence[ThreadMessage],
    reply: str | None = None,
    *,
    channel: str | None = None,
    budget_chars: int = DEFAULT_BUDGET_CHARS,
    memory: Sequence[str] = (),
) -> list[dict[str, str]]:
    """Chat messages for `context` (oldest first), optionally ending with the person's `reply`."""
    turns: list[dict[str, str]] = []
    for message in _within_budget(context, person_id, budget_chars):
        role = "assistant" if message.author_id == person_id else "user"
        line = _line(message, person_id)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + line
        else:
            turns.append({"role": role, "content": line})
    if reply is not None:
        if turns and turns[-1]["role"] == "assistant":
            turns[-1]["content"] += "\n" + reply
        else:
            turns.append({"role": "assistant", "content": reply})
    if not turns or turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": opening_line(channel)})
    return [{"role": "system", "content": system_prompt(person_name, memory=memory)}, *turns]


def _line(message: ThreadMessage, person_id: str) -> str:
    if message.author_id == person_id:
        return message.text
    return f"{message.author_name}: {message.text}"


def speaker(line: str) -> tuple[str | None, str]:
    """(author, text) of a line `_line` wrote as "Name: text"; (None, line) when it is not one (longer
    than `MAX_SPEAKER` before ": " is a sentence, not a display name)."""
    author, said, text = line.partition(": ")
    return (author, text) if said and len(author) <= MAX_SPEAKER else (None, line)


def _cost(message: ThreadMessage, person_id: str) -> int:
    return len(_line(message, person_id)) + 1


def _clip(message: ThreadMessage, person_id: str, budget_chars: int) -> ThreadMessage:
    """`message` clipped from the left to fit `budget_chars`."""
    cost = _cost(message, person_id)
    if cost <= budget_chars:
        return message
    room = max(budget_chars - (cost - len(message.text)), 1)
    return ThreadMessage(
        message.author_id, message.author_name, "…" + message.text[-room:], message.ts, message.addressee
    )


def _within_budget(
    context: Sequence[ThreadMessage], person_id: str, budget_chars: int
) -> list[ThreadMessage]:
    """The newest messages whose lines fit in `budget_chars`; the newest is clipped from the left if alone
    it does not fit, so the message being answered is never lost."""
    kept: list[ThreadMessage] = []
    used = 0
    for message in reversed(context):
        cost = _cost(message, person_id)
        if used + cost > budget_chars:
            if not kept and budget_chars > 0:
                kept.append(_clip(message, person_id, budget_chars))
            break
        kept.append(message)
        used += cost
    kept.reverse()
    return kept
