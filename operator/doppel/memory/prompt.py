"""Memory in the prompt, the same way for serving and for training.

Serving (`recall_for` then `build_conversation(..., memory=recall.lines())`): the message being answered
(the context's last) is the query; the person's best matching messages go into the system prompt under
the token budget, or, for a question none of them covers, the doppel abstains (`MemorySettings.abstain`).

Training (`remember_samples`): each sample's system prompt gets the messages retrieved for the message it
answers, from other conversations and older ones only (never the reply being trained, nor anything newer
than it), so the adapter learns to use what is retrieved, neither copying it nor ignoring it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from doppel.errors import BadInput
from doppel.memory.index import (
    DEFAULT_BUDGET_TOKENS,
    DEFAULT_K,
    DEFAULT_MIN_COVERAGE,
    MemoryIndex,
    Recall,
)
from doppel.memory.meaning import DEFAULT_MIN_RELATEDNESS
from doppel.memory.support import DEFAULT_MIN_SUPPORT
from doppel.slack.conversation import ThreadMessage, system_prompt
from doppel.slack.normalize import BOT_HANDLE


@dataclass(frozen=True)
class MemorySettings:
    k: int = DEFAULT_K
    budget_tokens: int = DEFAULT_BUDGET_TOKENS
    min_coverage: float = DEFAULT_MIN_COVERAGE  # under it a retrieved message is not used
    min_support: float = DEFAULT_MIN_SUPPORT  # under it a question is abstained on (doppel.memory.support)
    # the share of the person's real questions less related than which a question is abstained on
    # (doppel.memory.meaning); 0 turns the relatedness off
    min_relatedness: float = DEFAULT_MIN_RELATEDNESS
    abstain: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MemorySettings:
        """DOPPEL_MEMORY_MIN_COVERAGE, DOPPEL_MEMORY_MIN_SUPPORT, DOPPEL_MEMORY_MIN_RELATEDNESS,
        DOPPEL_MEMORY_BUDGET_TOKENS, DOPPEL_MEMORY_K, DOPPEL_MEMORY_ABSTAIN."""
        env = os.environ if env is None else env
        settings = cls()
        try:
            if env.get("DOPPEL_MEMORY_MIN_COVERAGE"):
                settings = replace(settings, min_coverage=float(env["DOPPEL_MEMORY_MIN_COVERAGE"]))
            if env.get("DOPPEL_MEMORY_MIN_SUPPORT"):
                settings = replace(settings, min_support=float(env["DOPPEL_MEMORY_MIN_SUPPORT"]))
            if env.get("DOPPEL_MEMORY_MIN_RELATEDNESS"):
                settings = replace(settings, min_relatedness=float(env["DOPPEL_MEMORY_MIN_RELATEDNESS"]))
            if env.get("DOPPEL_MEMORY_BUDGET_TOKENS"):
                settings = replace(settings, budget_tokens=int(env["DOPPEL_MEMORY_BUDGET_TOKENS"]))
            if env.get("DOPPEL_MEMORY_K"):
                settings = replace(settings, k=int(env["DOPPEL_MEMORY_K"]))
        except ValueError as exc:
            raise BadInput(f"DOPPEL_MEMORY_*: {exc}") from None
        if env.get("DOPPEL_MEMORY_ABSTAIN", "").lower() in {"0", "false", "no", "off"}:
            settings = replace(settings, abstain=False)
        if not 0 <= settings.min_coverage <= 1 or settings.budget_tokens < 0 or settings.k < 0:
            raise BadInput("DOPPEL_MEMORY_MIN_COVERAGE must be in [0, 1], the budget and k not negative")
        if not math.isfinite(settings.min_support):
            raise BadInput("DOPPEL_MEMORY_MIN_SUPPORT must be a number (log10 units, default -0.5)")
        if not 0 <= settings.min_relatedness <= 1:
            raise BadInput("DOPPEL_MEMORY_MIN_RELATEDNESS must be a share in [0, 1] (default 0.1; 0: off)")
        return settings


DEFAULT_SETTINGS = MemorySettings()


def recall_for(
    index: MemoryIndex | None, context: Sequence[ThreadMessage], settings: MemorySettings = DEFAULT_SETTINGS
) -> Recall:
    """What the person wrote that bears on the message being answered (`context[-1]`)."""
    if index is None or not context:
        return Recall()
    recall = index.search(
        query(context[-1].text),
        k=settings.k,
        budget_tokens=settings.budget_tokens,
        min_coverage=settings.min_coverage,
        min_support=settings.min_support,
        min_relatedness=settings.min_relatedness,
    )
    return recall if settings.abstain else replace(recall, question=False)


def query(text: str) -> str:
    """What is searched for a message: its words, without the bot's own mention."""
    return text.replace(BOT_HANDLE, " ")


def remember_samples(
    records: Iterable[dict[str, Any]],
    index: MemoryIndex,
    settings: MemorySettings = DEFAULT_SETTINGS,
    *,
    heldout_from: float | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """`records` (samples.jsonl) with memory in their system prompts; also how many got any.

    `heldout_from`: the training's held-out cut (`doppel.train.data.split_by_time`). A sample at or after
    it retrieves only messages from before it, the training split: held-out evaluation never sees another
    held-out message."""
    out, remembered = [], 0
    for record in records:
        lines = _lines_for(record, index, settings, heldout_from)
        if lines:
            messages = [dict(m) for m in record["messages"]]
            messages[0]["content"] = system_prompt(record["meta"]["person"], memory=lines)
            record = {**record, "messages": messages}
            remembered += 1
        out.append(record)
    return out, remembered


def _lines_for(
    record: dict[str, Any], index: MemoryIndex, settings: MemorySettings, heldout_from: float | None
) -> list[str]:
    messages, meta = record.get("messages") or [], record.get("meta") or {}
    person = meta.get("person")
    # Only a sample whose system prompt is the plain one (a scrape's) gets memory: never rewrite others.
    if not person or "ts" not in meta or len(messages) < 3 or messages[0].get("role") != "system":
        return []
    if messages[0]["content"] != system_prompt(person) or messages[-2].get("role") != "user":
        return []
    asked = query(messages[-2]["content"].splitlines()[-1])
    thread = f"{meta.get('channel_id') or ''}/{meta.get('thread_ts') or meta['ts']}"
    before = float(meta["ts"]) if heldout_from is None else min(float(meta["ts"]), heldout_from)
    # Never the sample's own conversation: a reply turn is often several Slack messages (the memory holds
    # each, the first ones older than the reply), and in the channel flow no thread keeps them out.
    conversation = (str(meta.get("channel_id") or ""), _started(meta))
    recall = index.search(
        asked,
        k=settings.k,
        budget_tokens=settings.budget_tokens,
        min_coverage=settings.min_coverage,
        min_relatedness=0,  # training uses the lines only: no abstention, no embedding to compute
        before_ts=before,
        exclude_thread=thread,
        exclude_since=conversation,
    )
    return recall.lines()


def _started(meta: Mapping[str, Any]) -> float:
    """When a sample's conversation began: `meta.context_ts`, else its reply's own time."""
    ts = float(meta["ts"])
    try:
        return min(float(meta.get("context_ts") or ts), ts)
    except (TypeError, ValueError):
        return ts
