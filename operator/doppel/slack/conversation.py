"""The one function that turns a Slack conversation into chat messages, and the one window rule.

A conversation is a thread, or, for a message posted in the channel rather than in a thread, its window:
`channel_window` takes the channel messages before it that follow each other with gaps of at most
`WindowRule.gap_seconds`, at most `WindowRule.max_messages` in all. Training (a channel message's
context) and serving (the bot mentioned outside a thread, `doppel chat`, `doppel local`) both cut windows
with it, so the model sees the same context it was trained on.

Training samples (`doppel scrape`) and inference prompts (the bot, `doppel chat`, `doppel local`) are both
built by `build_conversation`, so the model sees at serving time exactly the shape it was trained on.

Shape:
- a system prompt naming the person;
- the thread before the reply as user/assistant turns: the person's own messages are `assistant`, everyone
  else's are `user`; consecutive messages of one side are merged into one turn, one line per message;
- user lines are prefixed with their author (`Bob: ...`) because several people share the user side;
  assistant lines are not, since the assistant side has one author and a prefix would teach the model to
  write its own name;
- when the thread does not open with someone else's message, an opening user turn says so, so that every
  conversation alternates user/assistant and starts with a user turn (some chat templates insist);
- the context is bounded by a character budget, dropping the oldest messages first;
- with `reply` given (training), the conversation ends with that assistant turn; without it (inference),
  it ends with a user turn for the model to answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_BUDGET_CHARS = 4000
DEFAULT_WINDOW_GAP_S = 300.0
DEFAULT_WINDOW_MESSAGES = 10
MEMORY_HEADING = "Things you wrote before that may help (use them only if they answer):"


@dataclass(frozen=True)
class ThreadMessage:
    """One message of a thread, text already normalised (see `doppel.slack.normalize`)."""

    author_id: str
    author_name: str
    text: str
    ts: float = 0.0  # seconds since the epoch; only windows read it


@dataclass(frozen=True)
class WindowRule:
    """How far back a channel message's context reaches."""

    gap_seconds: float = DEFAULT_WINDOW_GAP_S
    max_messages: int = DEFAULT_WINDOW_MESSAGES


DEFAULT_WINDOW = WindowRule()


def channel_window(
    messages: Sequence[ThreadMessage], rule: WindowRule = DEFAULT_WINDOW
) -> list[ThreadMessage]:
    """The window ending with the last of `messages` (channel messages, oldest first): that message and the
    earlier ones each at most `rule.gap_seconds` before the next, at most `rule.max_messages` in all."""
    if not messages:
        return []
    start = len(messages) - 1
    while (
        start > 0
        and len(messages) - start < rule.max_messages
        and messages[start].ts - messages[start - 1].ts <= rule.gap_seconds
    ):
        start -= 1
    return list(messages[start:])


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


def _within_budget(
    context: Sequence[ThreadMessage], person_id: str, budget_chars: int
) -> list[ThreadMessage]:
    """The newest messages whose lines fit in `budget_chars`; the newest is clipped from the left if alone
    it does not fit, so the message being answered is never lost."""
    kept: list[ThreadMessage] = []
    used = 0
    for message in reversed(context):
        cost = len(_line(message, person_id)) + 1
        if used + cost > budget_chars:
            if not kept and budget_chars > 0:
                room = max(budget_chars - (cost - len(message.text)), 1)
                kept.append(
                    ThreadMessage(
                        message.author_id, message.author_name, "…" + message.text[-room:], message.ts
                    )
                )
            break
        kept.append(message)
        used += cost
    kept.reverse()
    return kept
