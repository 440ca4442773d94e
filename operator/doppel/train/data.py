"""Training data: read and validate samples.jsonl, tokenize with the chat template, split, batch.

Pure logic apart from the tokenizer: no torch here, so every rule is cheap to test.

- Each sample is rendered by the tokenizer's own chat template; labels are the token ids of its reply (the
  last assistant turn from `meta.reply_offset`: content and end-of-turn token, so the model learns to stop)
  and -100 everywhere else. The person's earlier turns in a context are context: each of their messages is
  the reply of its own sample, trained once.
- A sample longer than `max_length` keeps its system prompt and its final assistant turn whole and loses
  the oldest context tokens (counted as clipped). A reply too long to fit even then (a long write-up, a
  pasted log) keeps its beginning after the newest quarter-sample of context (counted as reply_cut): what
  someone who writes at length opens with is theirs too. Only a sample whose system prompt leaves no room
  is dropped (counted).
- Train and eval are split by time (`split_by_time`): the person's latest replies, whole conversations, are
  held out; a training sample never holds the text of a held-out reply, as reply or in its context.
- Batches are grouped by length, so padding is a few percent. (Padding-free packing needs varlen
  attention kernels; with a dense block-diagonal mask, as on CPU, attention cost grows with the square of
  the packed row and packing loses.)
- Where the context is run without gradient (`ReplyBatch`), a sample is split where its reply starts: the
  contexts left-padded so that they end together, the replies right-padded after them, and a step's
  micro-batches made of replies of similar length, which is what the trained part costs.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
COLLEAGUES_FILE = "colleagues.jsonl"  # beside samples.jsonl: doppel.slack.samples.write_output
# A budget's samples: the most characteristic of the newest this many times as many as it uses.
CHOICE_POOL = 3
# With the context run without gradient, what a token costs against one trained with its context's gradient
# (bfloat16 on 2 cores, SmolLM2-135M; fitted on hyperledger's ghaskins and jyellick, whose replies are 10%
# and 21% of the tokens; tests/bench/bench_train.py --replies compares): a context token its forward pass
# alone; a token of the replies' part more than a whole sample's, for their small batches.
CACHED_CONTEXT_TOKEN_COST = 0.3
REPLY_PART_TOKEN_COST = 2.0


@dataclass(frozen=True)
class Sample:
    messages: list[dict[str, str]]
    thread: str
    person: str | None = None  # meta.person: whom the system prompt names
    ts: float = 0.0  # when the reply was posted (meta.ts; else its line number)
    context_ts: float = 0.0  # its conversation's start (meta.context_ts; else its thread's first line)
    kind: str = "reply"  # meta.kind: "reply", or "opener" when the person opens a topic
    reply_offset: int = 0  # where the reply starts in the last turn (meta.reply_offset)

    weight: int = 1  # meta.weight: seen this many times an epoch (the person's corrections weigh more)

    @property
    def reply(self) -> str:
        return self.messages[-1]["content"][self.reply_offset :]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    thread: str
    weight: int = 1
    # Per-token loss weights where `labels` are set (None: 1 each): the context's weigh less than the reply's.
    weights: list[float] | None = None


@dataclass
class EncodeStats:
    clipped: int = 0
    reply_cut: int = 0
    dropped_too_long: int = 0


# A cut reply keeps at most this share of the sample for the context before it, and at least this many
# tokens of its own beginning (fewer teach nothing of the reply: the sample is dropped instead).
CUT_REPLY_CONTEXT_SHARE = 0.25
CUT_REPLY_MIN_TOKENS = 16


@dataclass(frozen=True)
class Batch:
    """One micro-batch of samples of similar length, right-padded to the longest."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    attention_mask: list[list[int]]
    weights: list[list[float]] | None = None  # per-token loss weights (None: every label weighs 1)

    @property
    def tokens(self) -> int:
        return sum(map(sum, self.attention_mask))

    @property
    def padding(self) -> int:
        return sum(len(row) for row in self.attention_mask) - self.tokens

    @property
    def label_tokens(self) -> int:
        return sum(1 for row in self.labels for label in row if label != IGNORE_INDEX)

    @property
    def label_weight(self) -> float:
        """What the batch's labels weigh together: the loss's normaliser."""
        if self.weights is None:
            return float(self.label_tokens)
        return sum(sum(row) for row in self.weights)


@dataclass(frozen=True)
class ReplyBatch:
    """A micro-batch split where each reply starts: `context_ids` left-padded (run once without gradient,
    keys and values cached), `reply_ids` right-padded after them (the trained part). A reply's part starts
    at the context's last token, whose output predicts the reply's first; `targets` are the next token of
    each position of that part (IGNORE_INDEX where there is none)."""

    context_ids: list[list[int]]
    context_mask: list[list[int]]
    reply_ids: list[list[int]]
    reply_mask: list[list[int]]
    targets: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(map(sum, self.context_mask)) + sum(map(sum, self.reply_mask))

    @property
    def padding(self) -> int:
        width = len(self.context_ids[0]) + len(self.reply_ids[0])
        return width * len(self.context_ids) - self.tokens

    @property
    def label_tokens(self) -> int:
        return sum(1 for row in self.targets for label in row if label != IGNORE_INDEX)

    @property
    def label_weight(self) -> float:
        return float(self.label_tokens)


@dataclass
class Split:
    train: list[Encoded] = field(default_factory=list)
    eval: list[Encoded] = field(default_factory=list)


@dataclass
class SampleSplit:
    """Samples on either side of the held-out cut, and those left out so that none leaks."""

    train: list[Sample] = field(default_factory=list)
    eval: list[Sample] = field(default_factory=list)
    cut_ts: float | None = None  # held out: conversations starting at or after this
    straddling: int = 0  # replies before the cut in conversations that began before it and go on after it
    leaking: int = 0  # training samples holding the text of a held-out reply (a message written twice)
    # Training samples that fit the sequence length, before a budget chose among them (`budget_split`).
    available: int | None = None

    def summary(self) -> dict[str, Any]:
        """What metrics.json records of the split."""
        return {
            "cut_ts": self.cut_ts,
            "train": len(self.train),
            "heldout": len(self.eval),
            "straddling": self.straddling,
            "leaking": self.leaking,
            "train_available": self.available if self.available is not None else len(self.train),
        }


def load_samples(path: Path) -> list[Sample]:
    """Parse samples.jsonl; any malformed line is a `BadInput` naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file not found: {path}")
    samples: list[Sample] = []
    # Without meta.context_ts, a conversation starts at its thread's first reply: in the same time as the
    # replies' (meta.ts, else line numbers), never a line number against Slack times.
    started: dict[str, float] = {}  # thread -> its earliest reply's ts
    unstarted: set[int] = set()  # samples without meta.context_ts
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
            thread = _thread_key(meta, messages)
            ts = _float(meta.get("ts"), lineno)
            started[thread] = min(started.get(thread, ts), ts)
            if math.isnan(_float(meta.get("context_ts"), math.nan)):
                unstarted.add(len(samples))
            samples.append(
                Sample(
                    messages,
                    thread,
                    meta.get("person"),
                    ts=ts,
                    context_ts=min(_float(meta.get("context_ts"), ts), ts),
                    kind=str(meta.get("kind") or "reply"),
                    reply_offset=_reply_offset(meta, messages),
                    weight=weight,
                )
            )
    for i in unstarted:
        samples[i] = replace(samples[i], context_ts=started[samples[i].thread])
    return samples


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float(default)


def _reply_offset(meta: dict[str, Any], messages: list[dict[str, str]]) -> int:
    offset = meta.get("reply_offset")
    if isinstance(offset, int) and 0 <= offset < len(messages[-1]["content"]):
        return offset
    return 0


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
    if len(messages) < 2:  # a chat template renders no prompt of nothing; the doppel is never asked so
        return "the person's reply needs a message before it (a system prompt or what it answers)"
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
    sample: Sample,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    stats: EncodeStats,
    context_weight: float = 0.0,
) -> Encoded | None:
    """Token ids and labels of a sample, clipped to `max_length` (the module says how); None if it cannot
    fit. The reply's tokens are labelled; with a `context_weight`, so are the context's, weighing that much
    each."""
    messages = sample.messages
    text = _render(tokenizer, messages)
    # The reply's character span: the text the last turn adds after its generation prompt, from where its
    # content starts plus the reply's offset in it (the person's messages before it there are context).
    turn_start = len(_render(tokenizer, messages[:-1], add_generation_prompt=True))
    content_start = text.find(messages[-1]["content"], turn_start)
    reply_start = turn_start if content_start < 0 else content_start + sample.reply_offset
    spans = [(reply_start, len(text))]
    # Where the final turn begins (its header) and where the system prompt ends.
    target_start = len(_render(tokenizer, messages[:-1])) if len(messages) > 1 else 0
    head_end = len(_render(tokenizer, messages[:1])) if messages[0]["role"] == "system" else 0

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    offsets: list[tuple[int, int]] = encoding["offset_mapping"]
    in_reply = [any(lo <= offset[0] < hi for lo, hi in spans) for offset in offsets]
    labels = [token if reply else IGNORE_INDEX for token, reply in zip(ids, in_reply, strict=True)]
    weights = None
    if context_weight > 0:
        labels = [IGNORE_INDEX, *ids[1:]]
        weights = [0.0] + [1.0 if reply else context_weight for reply in in_reply[1:]]
    if len(ids) <= max_length:
        return Encoded(ids, labels, sample.thread, sample.weight, weights)

    head = sum(1 for offset in offsets if offset[0] < head_end)
    target = sum(1 for offset in offsets if offset[0] >= target_start)
    room = max_length - head - target
    if room >= 0:
        stats.clipped += 1
        keep = list(range(head)) + list(range(len(ids) - target - room, len(ids)))
    else:
        first = len(ids) - target  # the final turn's first token
        context = min(first - head, int(max_length * CUT_REPLY_CONTEXT_SHARE))
        reply_room = max_length - head - context
        turn_header = sum(1 for offset in offsets[first:] if offset[0] < reply_start)
        if reply_room - turn_header < CUT_REPLY_MIN_TOKENS:
            stats.dropped_too_long += 1
            return None
        stats.reply_cut += 1
        keep = (
            list(range(head)) + list(range(first - context, first)) + list(range(first, first + reply_room))
        )
    kept_weights = None if weights is None else [weights[i] for i in keep]
    kept = [ids[i] for i in keep], [labels[i] for i in keep]
    return Encoded(*kept, sample.thread, sample.weight, kept_weights)


def encode_for_training(
    sample: Sample,
    tokenizer: PreTrainedTokenizerBase,
    train_length: int,
    max_length: int,
    stats: EncodeStats,
    context_weight: float = 0.0,
) -> Encoded | None:
    """`encode` at a budget's shorter `train_length`, or at `max_length` for a sample that cannot be cut
    that short (its memory and reply leave no room: a Japanese one, a long reply), rather than lose it."""
    if train_length < max_length:
        tried = EncodeStats()
        item = encode(sample, tokenizer, train_length, tried, context_weight)
        if item is not None:
            stats.clipped += tried.clipped
            stats.reply_cut += tried.reply_cut
            return item
    return encode(sample, tokenizer, max_length, stats, context_weight)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_by_time(samples: Sequence[Sample], eval_fraction: float) -> SampleSplit:
    """Hold out the person's latest replies, about `eval_fraction` of the samples, whole conversations.

    The cut is the time of the first of the latest `eval_fraction` replies. Held out: the samples whose
    conversation (`context_ts`) starts at or after the cut; trained: the samples posted before it. So no
    held-out message is in a training context by time; the few replies of conversations that span the cut
    are used by neither (`straddling`), and a training sample that holds a held-out reply's text anyway (the
    person wrote it twice) is left out too (`leaking`)."""
    ordered = sorted(samples, key=lambda s: s.ts)
    split = SampleSplit()
    if eval_fraction <= 0 or len(ordered) < 2:
        split.train = list(ordered)
        return split
    n_eval = min(max(math.ceil(len(ordered) * eval_fraction), 1), len(ordered) - 1)
    cut = ordered[len(ordered) - n_eval].ts
    held = [s for s in ordered if s.context_ts >= cut]
    if not held:  # one conversation spans the cut: hold out its replies from the cut on
        held = [s for s in ordered if s.ts >= cut]
        cut = min(s.context_ts for s in held)
    split.cut_ts, split.eval = cut, held
    held_ids = {id(s) for s in held}
    before = [s for s in ordered if s.ts < cut and id(s) not in held_ids]
    split.straddling = len(ordered) - len(held) - len(before)
    texts = [s.reply for s in held if s.reply.strip()]
    corpus = "\x00".join(m["content"] for s in before for m in s.messages)
    leaked = [t for t in texts if t in corpus]
    for sample in before:
        contents = [m["content"] for m in sample.messages]
        if leaked and any(t in c for t in leaked for c in contents):
            split.leaking += 1
        else:
            split.train.append(sample)
    return split


def budget_split(
    samples: Sequence[Sample],
    eval_fraction: float,
    max_train: int | None,
    max_eval: int | None,
    *,
    fits: Callable[[Sample], bool] | None = None,
    colleagues: Sequence[tuple[float, str]] = (),
    cost: Callable[[Sample], float] | None = None,
    max_cost: float | None = None,
    at_least: int = 1,
) -> SampleSplit:
    """`split_by_time`, then the training samples a budget uses (`choose` among those that `fits` the
    sequence length: the most characteristic of the person against `colleagues`' messages (ts, text) from
    before the cut; no more than `max_train`, and no more than their `cost` holds in `max_cost`, but at
    least `at_least`) and the held-out samples its loss is taken on (`spread`): the trainer's split, which
    the fidelity report recomputes."""
    split = split_by_time(samples, eval_fraction)
    train = [s for s in split.train if fits is None or fits(s)]
    split.available = len(train)
    costly = cost is not None and max_cost is not None and sum(map(cost, train)) > max_cost
    score = None
    if (costly or (max_train is not None and len(train) > max_train)) and colleagues:
        before = [text for ts, text in colleagues if split.cut_ts is None or ts < split.cut_ts]
        score = characteristic(train, before)
    split.train = choose(train, max_train, score)
    if costly and cost is not None and max_cost is not None:
        split.train = _choose_within(train, split.train, score, cost, max_cost, at_least)
    split.eval = spread(split.eval, max_eval)
    return split


def _choose_within(
    samples: Sequence[Sample],
    chosen: list[Sample],
    score: Mapping[int, float] | None,
    cost: Callable[[Sample], float],
    max_cost: float,
    at_least: int,
) -> list[Sample]:
    """`choose` of fewer of `samples` than `chosen` until their cost fits `max_cost`: a budget of tokens
    whose steps cannot take them all trains the ones it prefers once, not a random part of them."""
    while len(chosen) > at_least:
        spent = sum(map(cost, chosen))
        if spent <= max_cost:
            break
        fewer = max(at_least, min(len(chosen) - 1, int(len(chosen) * max_cost / spent)))
        chosen = choose(samples, fewer, score)
    return chosen


def read_colleagues(folder: Path) -> list[tuple[float, str]]:
    """(ts, text) of the colleagues' messages the scrape wrote beside the samples (`COLLEAGUES_FILE`)."""
    path = Path(folder) / COLLEAGUES_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [(_float(r.get("ts"), 0.0), str(r.get("text") or "")) for r in records if isinstance(r, dict)]


def characteristic(samples: Sequence[Sample], others: Sequence[str]) -> dict[int, float]:
    """id(sample) -> how much its reply reads as the person's rather than `others`' (out of fold)."""
    from doppel.train.likeness import characteristic_scores

    scores = characteristic_scores([s.reply for s in samples], others)
    return {id(s): score for s, score in zip(samples, scores, strict=True)}


def spread(samples: Sequence[Sample], count: int | None) -> list[Sample]:
    """At most `count` of `samples` (by time), evenly spaced: the held-out samples a loss is taken on, so
    that a large held-out set costs a bounded evaluation and still spans the whole held-out period."""
    ordered = sorted(samples, key=lambda s: s.ts)
    if count is None or len(ordered) <= count:
        return ordered
    return [ordered[i * len(ordered) // count] for i in range(count)]


def choose(
    samples: Sequence[Sample], count: int | None, score: Mapping[int, float] | None = None
) -> list[Sample]:
    """The training samples a budget of `count` uses: recent (the person as they write now) and, given a
    `score` (id(sample) -> how characteristic of the person it is), the most characteristic `count` of the
    newest `CHOICE_POOL` x `count`; replies before openers (at most a fifth openers, as answering is what the
    doppel does), one reply per text (a message the person wrote many times would be learnt as a template).
    Oldest first."""
    if count is None or len(samples) <= count:
        return sorted(samples, key=lambda s: s.ts)
    unique: dict[str, Sample] = {}
    for sample in sorted(samples, key=lambda s: s.ts, reverse=True):
        unique.setdefault(" ".join(sample.reply.split()).casefold(), sample)
    newest = list(unique.values())
    if score:
        pool = newest[: CHOICE_POOL * count]
        newest = sorted(pool, key=lambda s: -score.get(id(s), 0.0)) + newest[len(pool) :]
    openers = [s for s in newest if s.kind == "opener"][: count // 5]
    replies = [s for s in newest if s.kind != "opener"][: count - len(openers)]
    rest = [s for s in newest if s not in replies and s not in openers]
    return sorted([*replies, *openers, *rest][:count], key=lambda s: s.ts)


def weighted(items: Sequence[Encoded]) -> list[Encoded]:
    """Each training item as many times as its weight: a correction of weight 3 is learnt as three
    ordinary messages are (held-out evaluation is not weighted)."""
    return [item for item in items for _ in range(item.weight)]


def collate(items: Sequence[Encoded]) -> Batch:
    """Right-pad `items` to the longest; padding is masked out of attention and loss."""
    width = max(len(item.input_ids) for item in items)
    input_ids, labels, attention_mask, weights = [], [], [], []
    for item in items:
        pad = width - len(item.input_ids)
        input_ids.append(item.input_ids + [PAD_ID] * pad)
        labels.append(item.labels + [IGNORE_INDEX] * pad)
        attention_mask.append([1] * len(item.input_ids) + [0] * pad)
        row = item.weights or [1.0 if label != IGNORE_INDEX else 0.0 for label in item.labels]
        weights.append(row + [0.0] * pad)
    weighted = any(item.weights is not None for item in items)
    return Batch(input_ids, labels, attention_mask, weights if weighted else None)


def reply_start(item: Encoded) -> int:
    """Where `item`'s reply starts: its first labelled token."""
    return next(i for i, label in enumerate(item.labels) if label != IGNORE_INDEX)


def reply_tokens(item: Encoded) -> int:
    return len(item.input_ids) - reply_start(item)


def collate_replies(items: Sequence[Encoded]) -> ReplyBatch:
    """`items` split where their replies start, for training with the context run without gradient.
    The context must not be learnt (no per-token weights)."""
    if any(item.weights is not None for item in items):
        raise ValueError("a context learnt with a weight needs its gradient")
    # The part trained starts one token before the reply: that token's output predicts the reply's first.
    cuts = [max(reply_start(item) - 1, 1) for item in items]
    width = max(cuts)
    reply_width = max(len(item.input_ids) - cut for item, cut in zip(items, cuts, strict=True))
    batch = ReplyBatch([], [], [], [], [])
    for item, cut in zip(items, cuts, strict=True):
        pad, part = width - cut, item.input_ids[cut:]
        batch.context_ids.append([PAD_ID] * pad + item.input_ids[:cut])
        batch.context_mask.append([0] * pad + [1] * cut)
        right = reply_width - len(part)
        batch.reply_ids.append(part + [PAD_ID] * right)
        batch.reply_mask.append([1] * len(part) + [0] * right)
        batch.targets.append(item.labels[cut + 1 :] + [IGNORE_INDEX] * (right + 1))
    return batch


def train_cost(item: Encoded, context_gradient: bool = True) -> float:
    """What training on `item` costs, in tokens trained with their context's gradient (a budget's unit).
    Run without gradient, a context token costs its forward pass alone; the replies' part, in small
    batches that use the CPU less well than whole samples, costs more a token."""
    if context_gradient:
        return float(len(item.input_ids))
    reply = reply_tokens(item)
    return CACHED_CONTEXT_TOKEN_COST * (len(item.input_ids) - reply) + REPLY_PART_TOKEN_COST * reply


def epoch_batches(
    items: Sequence[Encoded], batch_size: int, rng: random.Random, group: int = LENGTH_GROUP
) -> list[Batch]:
    """Shuffled micro-batches of similar-length samples, so little compute goes to padding.

    Samples are shuffled, cut into windows of `group` micro-batches, sorted by length within a window
    and split; the batches are shuffled again so lengths do not follow a schedule.
    """
    return [collate(chunk) for chunk in _epoch_chunks(items, batch_size, rng, group)]


def epoch_steps(
    items: Sequence[Encoded],
    batch_size: int,
    grad_accum: int,
    rng: random.Random,
    context_gradient: bool = True,
) -> list[list[Batch]] | list[list[ReplyBatch]]:
    """The optimizer steps of an epoch: the batches `epoch_batches` makes of `batch_size` x `grad_accum`
    samples, each split into `grad_accum` micro-batches. Accumulating gradients is then only a way to save
    memory: a step sees the same samples, and learns the same, whatever the micro-batch size. Without the
    context's gradient, a step's samples are split where their replies start, its micro-batches made of
    replies of similar length."""
    steps = []
    for chunk in _epoch_chunks(items, batch_size * grad_accum, rng, LENGTH_GROUP):
        if context_gradient:
            steps.append([collate(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)])
        else:
            # Steps still mix long replies and short ones, as whole samples' steps do (a step's loss is the
            # mean over its tokens: steps of short replies alone would weigh each of theirs more).
            chunk = sorted(chunk, key=reply_tokens)
            steps.append(
                [collate_replies(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
            )
    return steps


def _epoch_chunks(
    items: Sequence[Encoded], batch_size: int, rng: random.Random, group: int
) -> list[list[Encoded]]:
    order = list(items)
    rng.shuffle(order)
    window = batch_size * group
    chunks: list[list[Encoded]] = []
    for start in range(0, len(order), window):
        ordered = sorted(order[start : start + window], key=lambda item: len(item.input_ids))
        chunks += [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(chunks)
    return chunks


def eval_batches(items: Sequence[Encoded], batch_size: int) -> list[Batch]:
    """Evaluation batches, grouped by length (order does not matter)."""
    ordered = sorted(items, key=lambda item: len(item.input_ids))
    return [collate(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
