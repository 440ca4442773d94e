"""The fidelity report (`eval.json`): does the adapter write like the person, better than a persona prompt?

On the replies the training held out (`doppel.train.data.split_by_time`, recomputed from the adapter's
recorded settings: the person's latest replies, whole conversations, none of their text in any training
sample), for an adapter and its base model. Replies are generated as the doppel is served, their first token
sampled (`doppel.serve.backend.OPENING_TEMPERATURE`), then greedily (temperature 0) and seeded, for up to
`EvalSettings.heldout_contexts` held-out contexts of kind `reply`, by the adapter, by the **persona-prompted**
base model (the same base with a system prompt naming the person and quoting a few of their training
messages: what a user would try without doppel); the plain base model replies to a few training contexts
for the classifier's "base model" class. The measures are in
`doppel.train.likeness`.

eval.json (every figure null when it cannot be measured):

    person, adapter                 whose adapter, where
    train_samples, heldout_samples  the split's two sides (after dropping samples too long to train on)
    split                           data.SampleSplit.summary(): cut_ts, train, heldout, straddling, leaking
    heldout_loss    {base, adapter}                 mean loss per reply token on the held-out samples
    likeness        {adapter, prompted_base, real,  share attributed to the person by the authorship
                     classifier_accuracy, classes,  classifier (the person, each colleague of
                     train_messages, test_messages} colleagues.jsonl, the base model); `real`: the real
                                                    held-out replies (the ceiling); accuracy on held-out
                                                    messages of every class
    relevance       {adapter, prompted_base}        closer to the real reply of the same context than to
                                                    the person's other held-out replies (> 0)
    distinct        {adapter, prompted_base, real}  share not near-duplicates of another reply of the set
                                                    (to another context)
    copy_rate       {adapter, prompted_base}        share repeating 12+ words of a training message
    memory_use      {adapter, real, replies}        of the replies whose prompt holds the person's memory
                                                    (`replies` of them), the share that draw on it
                                                    (`doppel.memory.attribution`): the adapter's, and the
                                                    real replies' (how often the person repeats it);
                                                    null when no prompt holds memory
    length          {adapter, prompted_base, person}  mean words per reply
    replies                                         held-out contexts replied to
    persona_prompt                                  the prompted base's system prompt
    classifier_base_replies                         base-model replies of the classifier's "base model" class
    per_reply       {contexts, taken_for_person,    the adapter's reply to each held-out context: taken for
                     relevance}                     the person's, its relevance (the gate's paired tests)
    uncertainty     {confidence, likeness,          what chance alone could move (`doppel.train.uncertainty`):
                     likeness_adapter_minus_        Wilson intervals of the likeness shares; the adapter
                     prompted_base, relevance_      minus the prompted base reply by reply, mean and
                     adapter_minus_prompted_base}   bootstrap interval
    baseline        {contexts, prompted_base, base} the replies that do not depend on the adapter: the
                                                    held-out contexts replied to (thread@ts), the prompted
                                                    base's replies to them, the base model's (all); reused
                                                    when another adapter is measured on the same contexts
    examples        [{context, real, adapter, prompted_base}]  held-out contexts side by side

The fidelity gate measures the serving adapter on its successor's held-out set (`evaluate_serving`): the
prompted base's and the base model's replies and held-out loss are the same for both, so only the serving
adapter replies and is scored then.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppel.fsutil import atomic_write_text
from doppel.memory.attribution import memory_use
from doppel.train import data
from doppel.train.gate import Paired
from doppel.train.likeness import (
    BASE_CLASS,
    PERSON_CLASS,
    AuthorClassifier,
    copy_rate,
    distinct,
    mean_relevance,
    relevance_scores,
    word_spans,
)
from doppel.train.report_sections import report_params
from doppel.train.uncertainty import describe, report_section

EVAL_FILE = "eval.json"
COLLEAGUES_FILE = "colleagues.jsonl"  # written beside samples.jsonl by doppel.slack.samples.write_output
PERSONA_EXAMPLES = 3
# Colleagues' held-out messages per class in the classifier's test set.
TEST_PER_COLLEAGUE = 40
__all__ = [
    "BASE_CLASS",
    "PERSON_CLASS",
    "EvalSettings",
    "evaluate_adapter",
    "evaluate_serving",
    "headline",
    "paired",
    "table",
]


@dataclass
class EvalSettings:
    # Held-out contexts replied to (adapter, prompted base, base), and training contexts the base model
    # replies to for the classifier's "base model" class.
    heldout_contexts: int = 24
    base_train_replies: int = 12  # the last third tests the classifier, the rest trains it
    reply_tokens: int = 64
    examples: int = 4
    batch_size: int = 16
    seed: int = 0


@dataclass
class SplitSamples:
    train: list[data.Sample] = field(default_factory=list)  # what the adapter was trained on
    eval: list[data.Sample] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    # Every sample before the cut, before a budget chose its training samples among them: the person as
    # the classifier knows them (a budget chooses the most characteristic; the classifier must not learn
    # the person from the very replies the adapter imitates).
    before_cut: list[data.Sample] = field(default_factory=list)


def split_samples(
    samples: Sequence[data.Sample], tokenizer: Any, config: dict[str, Any], folder: Path | None = None
) -> SplitSamples:
    """The training's own split (`data.budget_split` with the adapter's recorded `config` and the colleagues'
    messages it chose samples against, from `folder` or beside the recorded data), then the held-out samples
    it could encode."""
    max_length = int(config.get("max_length", 1024))
    train_length = min(int(config.get("train_max_length") or max_length), max_length)
    stats = data.EncodeStats()
    costs: dict[int, float] = {}

    def fits(sample: data.Sample) -> bool:
        item = data.encode_for_training(
            sample, tokenizer, train_length, max_length, stats, float(config.get("context_weight", 0.0))
        )
        if item is not None:
            costs[id(sample)] = data.train_cost(item, bool(config.get("context_gradient", True)))
        return item is not None

    recorded = Path(str(config["data"])).parent if config.get("data") else None
    held = data.budget_split(
        samples,
        float(config.get("eval_fraction", 0.15)),
        config.get("max_train_samples"),
        config.get("max_eval_samples"),
        fits=fits,
        colleagues=data.read_colleagues(folder or recorded) if (folder or recorded) else (),
        cost=lambda sample: costs[id(sample)],
        max_cost=config.get("max_train_tokens"),
        at_least=int(config.get("min_samples", 1)),
    )
    everything = data.split_by_time(samples, float(config.get("eval_fraction", 0.15))).train
    held_out = [s for s in held.eval if data.encode(s, tokenizer, max_length, stats) is not None]
    return SplitSamples(held.train, held_out, held.summary(), everything)


def persona_prompt(person: str, examples: Sequence[str]) -> str:
    """The system prompt of the persona-prompted base model: the person's name and a few real messages."""
    quoted = "\n".join(f"- {' '.join(text.split())}" for text in examples)
    return (
        f"You are {person}, chatting with colleagues on Slack. Reply as {person} would, in their tone, "
        f"length and habits. Some messages {person} wrote:\n{quoted}"
    )


def persona_examples(samples: Sequence[data.Sample], count: int = PERSONA_EXAMPLES) -> list[str]:
    """A few of the person's replies (deterministic, from `samples`) for the persona prompt."""
    replies = sorted({s.reply for s in samples})
    return random.Random(0).sample(replies, min(count, len(replies)))


def with_system(messages: Sequence[dict[str, str]], system: str) -> list[dict[str, str]]:
    """`messages` with its system prompt replaced by `system`."""
    rest = [dict(m) for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system}, *rest]


def read_colleagues(path: Path) -> list[dict[str, Any]]:
    """colleagues.jsonl: {user, name, ts, text} per message; [] when absent."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_adapter(
    base_model: Path,
    adapter: Path,
    samples_path: Path,
    *,
    metrics: dict[str, Any] | None = None,
    settings: EvalSettings | None = None,
    split_config: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fidelity report of `adapter` (see the module docstring). `metrics` is the adapter's
    metrics.json (read from `adapter` when not given); its held-out losses are reused when present.
    `split_config` (another training's config) measures the adapter on that training's held-out set, as the
    fidelity gate compares a serving adapter with its successor; `baseline`, that training's report, then
    gives the replies and loss that do not depend on the adapter, when they are of the same contexts."""
    from doppel.serve.backend import BASE_ADAPTER
    from doppel.serve.local import LocalBackend

    settings = settings or EvalSettings()
    metrics = metrics if metrics is not None else _read_metrics(adapter)
    config = metrics.get("config") or {}
    if split_config is not None:
        config, metrics = split_config, {"person": metrics.get("person")}  # its losses: another held-out set
    samples = data.load_samples(samples_path)
    person = metrics.get("person") or _person(samples)
    # float32 replies: the figures must not depend on whether the CPU computes bfloat16 (LocalBackend).
    backend = LocalBackend(base_model, {"adapter": adapter}, bf16=False)
    split = split_samples(samples, backend.tokenizer, config, _colleagues_folder(Path(samples_path), config))
    report: dict[str, Any] = {
        "person": person,
        "adapter": str(adapter),
        "train_samples": len(split.train),
        "heldout_samples": len(split.eval),
        "split": split.summary,
        "heldout_loss": None,
        **dict.fromkeys(("likeness", "relevance", "distinct", "copy_rate", "length"), None),
        "replies": 0,
        "examples": [],
    }
    rng = random.Random(settings.seed)
    replies = [s for s in split.eval if s.kind == "reply"] or split.eval
    heldout = _pick(replies, settings.heldout_contexts, rng)
    base_train = _pick(split.train, settings.base_train_replies, rng)
    persona = persona_prompt(person or "the person", persona_examples(split.train))
    params = report_params(settings.reply_tokens, settings.seed)
    reused = _reusable(baseline, heldout, len(base_train), persona, params.opening_temperature)
    base_loss = ((baseline or {}).get("heldout_loss") or {}).get("base") if reused else None
    # Preference tuning (`doppel.train.preference`) changed the adapter after its training measured it.
    tuned = bool((_read_metrics(adapter).get("preference") or {}).get("steps"))
    report["heldout_loss"] = _heldout_loss(backend, split, metrics, config, base_loss, tuned=tuned)
    if not split.eval or not split.train:
        return report

    requests: list[tuple[str, list[dict[str, str]]]] = []
    for sample in heldout:
        context = sample.messages[:-1]
        requests.append(("adapter", context))
        if reused is None:
            requests.append((BASE_ADAPTER, with_system(context, persona)))
    if reused is None:
        requests += [(BASE_ADAPTER, s.messages[:-1]) for s in base_train]
    # Prompted as the adapter was trained: a context longer than the training's sequence loses its oldest
    # messages (a Japanese thread of 4,000 characters is about 4,400 tokens: generating from 16 of them at
    # once took minutes and 7 GB).
    room = int(config.get("max_length", 1024)) - settings.reply_tokens
    requests = [(name, clipped(messages, backend.prompt_token_ids, room)) for name, messages in requests]
    texts = [t.strip() for t in _generate(backend, requests, params, settings.batch_size)]
    n = len(heldout)
    if reused is None:
        tuned, prompted, base_replies = texts[0 : 2 * n : 2], texts[1 : 2 * n : 2], texts[2 * n :]
    else:
        tuned, prompted, base_replies = texts, reused["prompted_base"], reused["base"]
    # The base model's class: trained on two thirds of its replies, tested on the rest.
    keep = len(base_replies) - len(base_replies) // 3
    base_train_replies, base_heldout = base_replies[:keep], base_replies[keep:]
    real = [s.reply for s in heldout]

    report["replies"] = n
    report["classifier_base_replies"] = base_train_replies
    report["likeness"], taken = _likeness(
        split, _colleagues(Path(samples_path), config), base_train_replies, base_heldout,
        {"adapter": tuned, "prompted_base": prompted, "real": real},
    )  # fmt: skip
    scores, prompted_scores = relevance_scores(tuned, real), relevance_scores(prompted, real)
    report["relevance"] = {
        "adapter": mean_relevance(scores),
        "prompted_base": mean_relevance(prompted_scores),
    }
    report["per_reply"] = {
        "contexts": _keys(heldout),
        "taken_for_person": taken["adapter"] if taken else None,
        "relevance": scores,
    }
    report["uncertainty"] = report_section(taken or {}, {"adapter": scores, "prompted_base": prompted_scores})
    contexts = [_render_context(sample) for sample in heldout]
    report["distinct"] = {
        "adapter": distinct(tuned, contexts),
        "prompted_base": distinct(prompted, contexts),
        "real": distinct(real, contexts),
    }
    spans = word_spans(m["content"] for s in split.train for m in s.messages if m["role"] != "system")
    report["copy_rate"] = {"adapter": copy_rate(tuned, spans), "prompted_base": copy_rate(prompted, spans)}
    report["length"] = {
        "adapter": _mean_words(tuned),
        "prompted_base": _mean_words(prompted),
        "person": _mean_words(real),
    }
    prompts = [sample.messages[:-1] for sample in heldout]
    report["memory_use"] = memory_use(prompts, {"adapter": tuned, "real": real}, person or "")
    report["persona_prompt"] = persona
    report["baseline"] = {
        "contexts": _keys(heldout),
        "prompted_base": prompted,
        "base": base_replies,
        "opening_temperature": params.opening_temperature,
    }
    report["examples"] = [
        {
            "context": _render_context(sample),
            "real": real[i],
            "adapter": tuned[i],
            "prompted_base": prompted[i],
        }
        for i, sample in enumerate(heldout[: settings.examples])
    ]
    return report


def evaluate_serving(
    base_model: Path, serving: Path, candidate: Path, samples_path: Path, new: dict[str, Any]
) -> dict[str, Any]:
    """The report of `serving` (the adapter served now) on the held-out set of `candidate` (its retrained
    successor, whose report is `new`): what the fidelity gate weighs the candidate against. The prompted
    base's and base model's replies and loss are `new`'s (the same contexts and prompts): only the serving
    adapter replies."""
    config = _read_metrics(candidate).get("config") or {}
    if not config:
        raise FileNotFoundError(f"no metrics.json with the training's config in {candidate}")
    return evaluate_adapter(base_model, serving, samples_path, split_config=config, baseline=new)


def paired(new: dict[str, Any], serving: dict[str, Any]) -> Paired | None:
    """The two reports' per-reply figures for the fidelity gate, when both have them for the same held-out
    contexts (`evaluate_serving` replies to the new report's); None otherwise (an older report)."""
    a, b = new.get("per_reply") or {}, serving.get("per_reply") or {}
    if not a.get("contexts") or a.get("contexts") != b.get("contexts"):
        return None
    if a.get("taken_for_person") is None or b.get("taken_for_person") is None:
        return None
    return Paired(
        person_new=a["taken_for_person"],
        person_serving=b["taken_for_person"],
        relevance_new=a.get("relevance") or (),
        relevance_serving=b.get("relevance") or (),
    )


def _keys(samples: Sequence[data.Sample]) -> list[str]:
    """Names of held-out contexts that survive a reload of the samples: thread and reply time."""
    return [f"{s.thread}@{s.ts}" for s in samples]


def _reusable(
    baseline: dict[str, Any] | None,
    heldout: Sequence[data.Sample],
    base_count: int,
    persona: str,
    opening_temperature: float | None,
) -> dict[str, list[str]] | None:
    """`baseline`'s replies that do not depend on the adapter, when they are of exactly these contexts,
    this persona prompt, this decoding and as many base-model replies; None otherwise (an older eval.json,
    another split)."""
    kept = (baseline or {}).get("baseline")
    if not isinstance(kept, dict) or (baseline or {}).get("persona_prompt") != persona:
        return None
    if kept.get("opening_temperature") != opening_temperature:
        return None
    if kept.get("contexts") != _keys(heldout):
        return None
    prompted, base = kept.get("prompted_base"), kept.get("base")
    if not isinstance(prompted, list) or len(prompted) != len(heldout):
        return None
    if not isinstance(base, list) or len(base) != base_count:
        return None
    return {"prompted_base": [str(t) for t in prompted], "base": [str(t) for t in base]}


def _likeness(
    split: SplitSamples,
    colleagues: Sequence[dict[str, Any]],
    base_train: Sequence[str],
    base_heldout: Sequence[str],
    replies: dict[str, list[str]],
) -> tuple[dict[str, Any] | None, dict[str, list[bool]] | None]:
    """Shares of `replies` the classifier attributes to the person, and its accuracy on held-out messages;
    and which of each set's replies it attributes to the person."""
    texts, labels, tests = _classifier_data(split, colleagues, base_train)
    classifier = _fitted(tuple(texts), tuple(labels))
    if classifier is None:
        return None, None
    test_texts = [s.reply for s in split.eval] + list(base_heldout) + [t for t, _ in tests]
    test_labels = [PERSON_CLASS] * len(split.eval) + [BASE_CLASS] * len(base_heldout) + [y for _, y in tests]
    taken = {name: classifier.taken_for_person(texts) for name, texts in replies.items()}
    figures = {
        **{name: classifier.person_share(flags) for name, flags in taken.items()},
        "classifier_accuracy": classifier.accuracy(test_texts, test_labels),
        "classes": classifier.classes,
        "train_messages": len(texts),
        "test_messages": len(test_texts),
    }
    return figures, taken


@functools.lru_cache(maxsize=1)
def _fitted(texts: tuple[str, ...], labels: tuple[str, ...]) -> AuthorClassifier | None:
    """The classifier of these messages, fitted once: the fidelity gate's two reports of one training (the
    new adapter's, the serving one's on the same held-out set) judge with the same classifier, and a fit
    takes seconds (about 6 on 2 cores for 2,700 messages)."""
    return AuthorClassifier.fit(texts, labels)


def _classifier_data(
    split: SplitSamples, colleagues: Sequence[dict[str, Any]], base_train: Sequence[str]
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The classifier's training texts and labels (the person's replies before the cut, all of them, not
    only those a budget trained on; the colleagues' messages before the cut; the base model's replies), and
    the colleagues' held-out messages with their label. Without real times in the samples, each
    colleague's last sixth is held out."""
    cut = split.summary.get("cut_ts")
    names = _colleague_labels(colleagues)
    person = split.before_cut or split.train
    texts = [s.reply for s in person] + list(base_train)
    labels = [PERSON_CLASS] * len(person) + [BASE_CLASS] * len(base_train)
    tests: list[tuple[str, str]] = []
    for user, messages in _by_user(colleagues).items():
        at = sum(1 for m in messages if float(m["ts"]) < cut) if cut and cut > 1e9 else len(messages) * 5 // 6
        texts += [m["text"] for m in messages[:at]]
        labels += [names[user]] * at
        tests += [(m["text"], names[user]) for m in messages[at:][:TEST_PER_COLLEAGUE]]
    return texts, labels, tests


def _colleagues_folder(samples_path: Path, config: dict[str, Any]) -> Path | None:
    """Where colleagues.jsonl is: beside the samples, or beside the samples the training recorded (when it
    trained on a derived file: memory, corrections)."""
    for folder in (samples_path.parent, Path(str(config.get("data") or samples_path)).parent):
        if (folder / COLLEAGUES_FILE).is_file():
            return folder
    return None


def _colleagues(samples_path: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """colleagues.jsonl's messages (`_colleagues_folder`), [] without one."""
    folder = _colleagues_folder(samples_path, config)
    return read_colleagues(folder / COLLEAGUES_FILE) if folder else []


def _by_user(colleagues: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for message in sorted(colleagues, key=lambda m: float(m["ts"])):
        grouped.setdefault(str(message["user"]), []).append(message)
    return grouped


def _colleague_labels(colleagues: Sequence[dict[str, Any]]) -> dict[str, str]:
    """User ID -> class name: the display name, with the ID when two share one."""
    names = {str(m["user"]): str(m.get("name") or m["user"]) for m in colleagues}
    taken = [*names.values(), PERSON_CLASS, BASE_CLASS]
    return {user: name if taken.count(name) == 1 else f"{name} ({user})" for user, name in names.items()}


def report_classifier(adapter: Path, samples_path: Path) -> AuthorClassifier | None:
    """The classifier of the adapter's eval.json, fitted again (the same data, so the same model), to
    attribute replies obtained elsewhere (a vLLM server, the bot)."""
    from transformers import AutoTokenizer

    report = json.loads((Path(adapter) / EVAL_FILE).read_text(encoding="utf-8"))
    config = _read_metrics(adapter).get("config") or {}
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"])
    split = split_samples(
        data.load_samples(samples_path), tokenizer, config, _colleagues_folder(Path(samples_path), config)
    )
    colleagues = _colleagues(Path(samples_path), config)
    texts, labels, _ = _classifier_data(split, colleagues, report.get("classifier_base_replies") or [])
    return AuthorClassifier.fit(texts, labels)


def _heldout_loss(
    backend: Any,
    split: SplitSamples,
    metrics: dict[str, Any],
    config: dict[str, Any],
    base_loss: float | None = None,
    *,
    tuned: bool = False,
) -> dict[str, float | None]:
    """The held-out losses: the training's own when they are of this split (the same cut and counts: a
    scrape since then moved the cut, while a budget's held-out set has as many samples); else computed (the
    base model's only when not known: `base_loss`). The adapter's is computed when it was `tuned` after its
    training (preference tuning): the training's is of the adapter before."""
    if (
        metrics.get("base_eval_loss") is not None
        and metrics.get("eval_samples") == len(split.eval)
        and metrics.get("heldout") == split.summary
    ):
        if not tuned:
            return {"base": metrics["base_eval_loss"], "adapter": metrics.get("adapter_eval_loss")}
        base_loss = metrics["base_eval_loss"] if base_loss is None else base_loss
    if not split.eval:
        return {"base": None, "adapter": None}
    from doppel.train.trainer import evaluate

    stats = data.EncodeStats()
    max_length = int(config.get("max_length", 1024))
    encoded = [e for s in split.eval if (e := data.encode(s, backend.tokenizer, max_length, stats))]
    batches = data.eval_batches(encoded, int(config.get("batch_size", 4)))
    model = backend.model
    device = next(model.parameters()).device
    adapter_loss = evaluate(model, batches, device)
    if base_loss is None:
        with model.disable_adapter():
            base_loss = evaluate(model, batches, device)
    return {"base": base_loss, "adapter": adapter_loss}


def clipped(
    messages: Sequence[dict[str, str]], count: Callable[[Sequence[dict[str, str]]], list[int]], limit: int
) -> list[dict[str, str]]:
    """`messages` within `limit` prompt tokens (`count` gives a prompt's token ids), as training clips a
    context: the system prompt stays and the conversation's oldest lines go first (a turn left without
    any goes). The last line is kept even when it alone is longer than the limit."""
    head, turns = list(messages[:1]), list(messages[1:])
    lines = [(turn, line) for turn, message in enumerate(turns) for line in message["content"].split("\n")]

    def without(oldest: int) -> list[dict[str, str]]:
        kept = lines[oldest:]
        rest = [
            {**message, "content": "\n".join(line for t, line in kept if t == turn)}
            for turn, message in enumerate(turns)
            if any(t == turn for t, _ in kept)
        ]
        return head + rest

    if not lines or len(count(without(0))) <= limit:
        return without(0)
    low, high = 1, len(lines) - 1  # the fewest oldest lines to leave out: a search, a prompt counted each
    while low < high:
        middle = (low + high) // 2
        if len(count(without(middle))) <= limit:
            high = middle
        else:
            low = middle + 1
    return without(low)


def _generate(
    backend: Any, requests: list[tuple[str, list[dict[str, str]]]], params: Any, size: int
) -> list[str]:
    """Replies in request order, generated in batches of similar prompt length (less padding), one adapter
    a batch: padding changes a batched reply's floats, so an adapter's replies must not depend on what else
    was asked (the fidelity gate measures a serving adapter without the base model's requests)."""
    lengths = [len(backend.render_prompt(m)) for _, m in requests]
    texts = [""] * len(requests)
    for adapter in dict.fromkeys(a for a, _ in requests):
        order = sorted((i for i, (a, _) in enumerate(requests) if a == adapter), key=lengths.__getitem__)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            for index, text in zip(
                chunk, backend.complete_batch([requests[i] for i in chunk], params), strict=True
            ):
                texts[index] = text
    return texts


def _pick(samples: Sequence[data.Sample], count: int, rng: random.Random) -> list[data.Sample]:
    """Up to `count` samples, at most one per thread first (so one long thread does not dominate)."""
    by_thread: dict[str, data.Sample] = {}
    for sample in samples:
        by_thread.setdefault(sample.thread, sample)
    firsts = sorted(by_thread.values(), key=lambda s: s.thread)
    rng.shuffle(firsts)
    rest = [s for s in samples if by_thread.get(s.thread) is not s]
    return (firsts + rest)[:count]


def _render_context(sample: data.Sample) -> str:
    last = sample.messages[-1]["content"][: sample.reply_offset].rstrip()
    return "\n".join([*(m["content"] for m in sample.messages[1:-1]), *([last] if last else [])])


def _mean_words(texts: Sequence[str]) -> float:
    return round(sum(len(t.split()) for t in texts) / max(len(texts), 1), 1)


def _person(samples: Sequence[data.Sample]) -> str | None:
    names = {s.person for s in samples}
    return names.pop() if len(names) == 1 else None


def _read_metrics(adapter: Path) -> dict[str, Any]:
    try:
        metrics = json.loads((Path(adapter) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def write_report(adapter: Path, report: dict[str, Any]) -> Path:
    path = Path(adapter) / EVAL_FILE
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a result file and `status.eval` carry (the fields of `doppel.api.EvalSummary`)."""
    loss = report.get("heldout_loss") or {}
    like = report.get("likeness") or {}
    rel = report.get("relevance") or {}
    return {
        "heldout_loss_base": _round(loss.get("base")),
        "heldout_loss_adapter": _round(loss.get("adapter")),
        "likeness_adapter": like.get("adapter"),
        "likeness_prompted_base": like.get("prompted_base"),
        "likeness_real": like.get("real"),
        "likeness_classifier_accuracy": like.get("classifier_accuracy"),
        "relevance_adapter": rel.get("adapter"),
        "relevance_prompted_base": rel.get("prompted_base"),
        "distinct_adapter": (report.get("distinct") or {}).get("adapter"),
        "copy_rate_adapter": (report.get("copy_rate") or {}).get("adapter"),
        "heldout_samples": report.get("heldout_samples"),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _figure(value: float | None, form: str = ".2f") -> str:
    return "-" if value is None else format(value, form)


def table(report: dict[str, Any]) -> str:
    """The short table `doppel eval` and `doppel local` print."""
    loss = report.get("heldout_loss") or {}
    lines = [
        f"fidelity on {report.get('heldout_samples', 0)} held-out samples, the person's latest "
        f"({report.get('replies', 0)} replied to; eval.json):"
    ]
    base, tuned = loss.get("base"), loss.get("adapter")
    if base is not None and tuned is not None:
        change = (tuned - base) / base * 100 if base else 0.0
        lines.append(f"  held-out loss       base {base:.3f}  adapter {tuned:.3f}  ({change:+.0f}%)")
    like = report.get("likeness")
    if not like:
        lines.append("  likeness            not measured (no held-out replies or no one to tell apart)")
        return "\n".join(lines)
    rel, dist, copy = (report.get(k) or {} for k in ("relevance", "distinct", "copy_rate"))
    length = report.get("length") or {}
    lines += [
        f"  likeness            adapter {_figure(like.get('adapter'))}  persona-prompted base "
        f"{_figure(like.get('prompted_base'))}  real replies {_figure(like.get('real'))}  "
        f"(classifier accuracy {_figure(like.get('classifier_accuracy'))}, "
        f"{len(like.get('classes', []))} classes)",
        f"  relevance           adapter {_figure(rel.get('adapter'), '+.3f')}  persona-prompted base "
        f"{_figure(rel.get('prompted_base'), '+.3f')}",
        f"  distinct            adapter {_figure(dist.get('adapter'))}  persona-prompted base "
        f"{_figure(dist.get('prompted_base'))}  real replies {_figure(dist.get('real'))}",
        f"  copy rate           adapter {_figure(copy.get('adapter'))}  persona-prompted base "
        f"{_figure(copy.get('prompted_base'))}",
        f"  mean reply words    adapter {length.get('adapter')}  persona-prompted base "
        f"{length.get('prompted_base')}  real {length.get('person')}",
    ]
    use = report.get("memory_use")
    if use:
        lines.append(
            f"  memory drawn on     adapter {_figure(use.get('adapter'))}  real replies "
            f"{_figure(use.get('real'))}  (of {use.get('replies')} replies with memory in the prompt)"
        )
    spread = report.get("uncertainty") or {}
    likeness_gap = spread.get("likeness_adapter_minus_prompted_base")
    relevance_gap = spread.get("relevance_adapter_minus_prompted_base")
    if likeness_gap or relevance_gap:
        lines.append(
            f"  adapter - prompted  likeness {describe(likeness_gap, '+.2f')}  relevance "
            f"{describe(relevance_gap, '+.3f')}  (mean, 95% interval over {report.get('replies', 0)} replies)"
        )
    return "\n".join(lines)
