"""The abstention reply: the doppel says it does not know, in the person's habits, and names the real person
to ask (by name, never as a mention: no ping).

A fixed sentence rather than the model's: the adapter was never trained to abstain (nobody's Slack history
says "my messages don't cover this"), and an invented answer is exactly what abstaining avoids. It follows
the two habits the index measured (`doppel.memory.index.voice_habits`): lower-case openings and full stops.
"""

from __future__ import annotations

from collections.abc import Mapping

ABSTAIN_TEMPLATE = "Not sure, I don't think I've written about that. Best ask {name} directly."


def abstention(name: str, habits: Mapping[str, float] | None = None) -> str:
    """What the doppel of `name` says to a question their messages do not cover."""
    name = name.replace("@", "").strip() or "them"  # a name, never a mention
    text = ABSTAIN_TEMPLATE.format(name=name)
    habits = habits or {}
    if habits.get("lowercase", 0.0) > 0.5:
        text = text[0].lower() + text[1:]
    if habits.get("full_stop", 1.0) < 0.5:
        text = text.removesuffix(".")
    return text
