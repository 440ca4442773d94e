"""Training data: read and validate samples.jsonl, tokenize with the chat template, split, batch.

Pure logic apart from the tokenizer: no torch here, so every rule is cheap to test.

- Each sample is rendered by the tokenizer's own chat template; labels are the token ids of the assistant
  turns (content and end-of-turn token, so the model learns to stop) and -100 everywhere else.
- A sample longer than `max_length` keeps its system prompt and its final assistant turn whole and loses
  the oldest context tokens (counted as clipped); if even that does not fit it is dropped (counted).
- Train and eval are split by thread, so no thread is seen in both.
- Batches are grouped by length, so padding is a few percent. (Padding-free packing needs varlen
  attention kernels; with a dense block-diagonal mask, as on CPU, attention cost grows with the square of
  the packed row and packing loses.)
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from doppel.errors import BadInput

IGNORE_INDEX = -100
# Micro-batches per length-sorting window: wide enough to find similar lengths, narrow enough to stay random.
LENGTH_GROUP = 16
# Any id will do for padding: it is masked out of attention and loss.
PAD_ID = 0
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sample:
    messages: list[dict[str, str]]
    thread: str
    person: str | None = None  # meta.person: whom the system prompt names
    weight: int = 1  # meta.weight: seen this many times an epoch (the person's corrections weigh more)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    thread: str
    weight: int = 1


@dataclass
class EncodeStats:
    clipped: int = 0
    dropped_too_long: int = 0


@dataclass(frozen=True)
class Batch:
    """One micro-batch of samples of similar length, right-padded to the longest."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    attention_mask: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(map(sum, self.attention_mask))

    @property
    def padding(self) -> int:
        return sum(len(row) for row in self.attention_mask) - self.tokens

    @property
    def label_tokens(self) -> int:
        return sum(1 for row in self.labels for label in row if label != IGNORE_INDEX)


@dataclass
class Split:
    train: list[Encoded] = field(default_factory=list)
    eval: list[Encoded] = field(default_factory=list)


def load_samples(path: Path) -> list[Sample]:
    """Parse samples.jsonl; any malformed line is a `BadInput` naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file not found: {path}")
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            problem = _sample_problem(record)
            if problem:
                raise BadInput(f"{path}:{lineno}: {problem}")
            messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
            meta = record.get("meta") or {}
            weight = meta.get("weight", 1)
            if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 10:
                raise BadInput(f"{path}:{lineno}: meta.weight must be a whole number from 1 to 10")
            samples.append(Sample(messages, _thread_key(meta, messages), meta.get("person"), weight))
    return samples


def _sample_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "expected a JSON object"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {index} is not an object"
        if message.get("role") not in ROLES:
            return f"message {index} has role {message.get('role')!r}, expected one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {index} has no string 'content'"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the person's (role 'assistant')"
    if "meta" in record and not isinstance(record["meta"], dict):
        return "'meta' must be an object"
    return None


def _thread_key(meta: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """Identify the Slack thread a sample comes from, so the split never shares a thread."""
    if meta.get("thread_id"):
        return str(meta["thread_id"])
    if meta.get("thread_ts"):
        return f"{meta.get('channel_id') or meta.get('channel', '')}/{meta['thread_ts']}"
    # Without metadata, samples of one thread share their opening message.
    opening = next((m["content"] for m in messages if m["role"] != "system"), "")
    return "opening:" + opening


def encode(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, max_length: int, stats: EncodeStats
) -> Encoded | None:
    """Token ids and assistant-only labels of a sample, clipped to `max_length`; None if it cannot fit."""
    messages = sample.messages
    text = _render(tokenizer, messages)
    # Character spans of each assistant turn: the text a turn adds after its generation prompt.
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_render(tokenizer, messages[:index], add_generation_prompt=True))
            end = len(_render(tokenizer, messages[: index + 1]))
            spans.append((start, end))
    # Where the final turn begins (its header) and where the system prompt ends.
    target_start = len(_render(tokenizer, messages[:-1])) if len(messages) > 1 else 0
    head_end = len(_render(tokenizer, messages[:1])) if messages[0]["role"] == "system" else 0

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    offsets: list[tuple[int, int]] = encoding["offset_mapping"]
    labels = [
        token if any(lo <= offset[0] < hi for lo, hi in spans) else IGNORE_INDEX
        for token, offset in zip(ids, offsets, strict=True)
    ]
    if len(ids) <= max_length:
        return Encoded(ids, labels, sample.thread, sample.weight)

    head = sum(1 for offset in offsets if offset[0] < head_end)
    target = sum(1 for offset in offsets if offset[0] >= target_start)
    room = max_length - head - target
    if room < 0:
        stats.dropped_too_long += 1
        return None
    stats.clipped += 1
    keep = list(range(head)) + list(range(len(ids) - target - room, len(ids)))
    return Encoded([ids[i] for i in keep], [labels[i] for i in keep], sample.thread, sample.weight)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_by_thread(encoded: Sequence[Encoded], eval_fraction: float, seed: int) -> Split:
    """Hold out about `eval_fraction` of the threads (at least one when there are two or more)."""
    threads = sorted({item.thread for item in encoded})
    random.Random(seed).shuffle(threads)
    n_eval = math.ceil(len(threads) * eval_fraction) if eval_fraction > 0 and len(threads) > 1 else 0
    n_eval = min(n_eval, len(threads) - 1)
    held_out = set(threads[:n_eval])
    split = Split()
    for item in encoded:
        (split.eval if item.thread in held_out else split.train).append(item)
    return split


def weighted(items: Sequence[Encoded]) -> list[Encoded]:
    """Each training item as many times as its weight: a correction of weight 3 is learnt as three
    ordinary messages are (held-out evaluation is not weighted)."""
    return [item for item in items for _ in range(item.weight)]


def collate(items: Sequence[Encoded]) -> Batch:
    """Right-pad `items` to the longest; padding is masked out of attention and loss."""
    width = max(len(item.input_ids) for item in items)
    input_ids, labels, attention_mask = [], [], []
    for item in items:
        pad = width - len(item.input_ids)
        input_ids.append(item.input_ids + [PAD_ID] * pad)
        labels.append(item.labels + [IGNORE_INDEX] * pad)
        attention_mask.append([1] * len(item.input_ids) + [0] * pad)
    return Batch(input_ids, labels, attention_mask)


def epoch_batches(
    items: Sequence[Encoded], batch_size: int, rng: random.Random, group: int = LENGTH_GROUP
) -> list[Batch]:
    """Shuffled micro-batches of similar-length samples, so little compute goes to padding.

    Samples are shuffled, cut into windows of `group` micro-batches, sorted by length within a window
    and split; the batches are shuffled again so lengths do not follow a schedule.
    """
    order = list(items)
    rng.shuffle(order)
    window = batch_size * group
    batches: list[Batch] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda item: len(item.input_ids))
        batches += [collate(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(items: Sequence[Encoded], batch_size: int) -> list[Batch]:
    """Evaluation batches, grouped by length (order does not matter)."""
    ordered = sorted(items, key=lambda item: len(item.input_ids))
    return [collate(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
