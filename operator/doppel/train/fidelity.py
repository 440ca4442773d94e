"""The fidelity report (`eval.json`): does the adapter write like the person, better than a persona prompt?

On the threads the training held out (the same split by thread, recomputed from the adapter's recorded
settings), for an adapter and its base model:

- `heldout_loss`: mean loss per reply token, base model vs adapter;
- `style_match`: the share of replies, generated for held-out contexts, that an authorship classifier
  attributes to the person, for the adapter and for the **persona-prompted** base model (the same base with a
  system prompt naming the person and quoting a few of their messages: what a user would try without
  doppel). The classifier (scikit-learn: character n-gram TF-IDF, logistic regression) is fitted on the
  training split only: the person's replies, the other people's messages of those threads (one class each),
  and replies of the un-adapted base model as one more class, "the base model": without it fluent generic
  prose goes to whoever writes most formally;
- `style_classifier_accuracy`: its accuracy on held-out real messages and held-out base-model replies;
- `length`: mean words of the adapter's, the prompted base's and the person's real held-out replies;
- `examples`: a few held-out contexts with the real reply, the adapter's and the prompted base's.

Generation is greedy (temperature 0), all replies in a few mixed-adapter batches of the in-process backend.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppel.fsutil import atomic_write_text
from doppel.train import data

EVAL_FILE = "eval.json"
PERSON_CLASS = "person"
BASE_CLASS = "base model"
# A context line "Name: text" of build_conversation; continuation lines belong to the message above.
_AUTHOR_LINE = re.compile(r"^([^\s:()][^:\n]{0,60}): (.*)$")
PERSONA_EXAMPLES = 3


@dataclass
class EvalSettings:
    # Held-out contexts replied to (adapter, prompted base, base), and training contexts the base model
    # replies to for the classifier's "base model" class.
    heldout_contexts: int = 12
    base_train_replies: int = 16
    reply_tokens: int = 64
    examples: int = 3
    batch_size: int = 16
    seed: int = 0


@dataclass
class SplitSamples:
    train: list[data.Sample] = field(default_factory=list)
    eval: list[data.Sample] = field(default_factory=list)


def split_samples(
    samples: Sequence[data.Sample], tokenizer: Any, max_length: int, eval_fraction: float, seed: int
) -> SplitSamples:
    """The training's own split (`data.split_by_thread` on the encoded samples), as samples."""
    stats = data.EncodeStats()
    pairs = [(s, e) for s in samples if (e := data.encode(s, tokenizer, max_length, stats)) is not None]
    split = data.split_by_thread([e for _, e in pairs], eval_fraction, seed)
    held_out = {e.thread for e in split.eval}
    out = SplitSamples()
    for sample, encoded in pairs:
        (out.eval if encoded.thread in held_out else out.train).append(sample)
    return out


def persona_prompt(person: str, examples: Sequence[str]) -> str:
    """The system prompt of the persona-prompted base model: the person's name and a few real messages."""
    quoted = "\n".join(f"- {' '.join(text.split())}" for text in examples)
    return (
        f"You are {person}, chatting with colleagues on Slack. Reply as {person} would, in their tone, "
        f"length and habits. Some messages {person} wrote:\n{quoted}"
    )


def persona_examples(samples: Sequence[data.Sample], count: int = PERSONA_EXAMPLES) -> list[str]:
    """A few of the person's replies (deterministic, from `samples`) for the persona prompt."""
    replies = sorted({s.messages[-1]["content"] for s in samples})
    return random.Random(0).sample(replies, min(count, len(replies)))


def with_system(messages: Sequence[dict[str, str]], system: str) -> list[dict[str, str]]:
    """`messages` with its system prompt replaced by `system`."""
    rest = [dict(m) for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system}, *rest]


def context_messages(sample: data.Sample) -> list[tuple[str, str]]:
    """(author, text) of the other people's messages in a sample's context."""
    found: list[tuple[str, str]] = []
    for message in sample.messages[:-1]:
        if message["role"] != "user":
            continue
        for line in message["content"].splitlines():
            match = _AUTHOR_LINE.match(line)
            if match:
                found.append((match[1], match[2]))
            elif found and line.strip():
                found[-1] = (found[-1][0], found[-1][1] + "\n" + line)
    return found


def words(text: str) -> int:
    return len(text.split())


def evaluate_adapter(
    base_model: Path,
    adapter: Path,
    samples_path: Path,
    *,
    metrics: dict[str, Any] | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """The fidelity report of `adapter` (see the module docstring). `metrics` is the adapter's
    metrics.json (read from `adapter` when not given); its held-out losses are reused when present."""
    from doppel.serve.backend import BASE_ADAPTER, GenerationParams
    from doppel.serve.local import LocalBackend

    settings = settings or EvalSettings()
    metrics = metrics if metrics is not None else _read_metrics(adapter)
    config = metrics.get("config") or {}
    samples = data.load_samples(samples_path)
    person = metrics.get("person") or _person(samples)
    backend = LocalBackend(base_model, {"adapter": adapter})
    split = split_samples(
        samples,
        backend.tokenizer,
        int(config.get("max_length", 1024)),
        float(config.get("eval_fraction", 0.1)),
        int(config.get("seed", 0)),
    )
    report: dict[str, Any] = {
        "person": person,
        "adapter": str(adapter),
        "train_samples": len(split.train),
        "heldout_samples": len(split.eval),
        "heldout_loss": _heldout_loss(backend, split, metrics, config),
        "style_match": None,
        "style_classifier_accuracy": None,
        "length": None,
        "examples": [],
    }
    if not split.eval or not split.train:
        return report

    rng = random.Random(settings.seed)
    heldout = _pick(split.eval, settings.heldout_contexts, rng)
    base_train = _pick(split.train, settings.base_train_replies, rng)
    persona = persona_prompt(person or "the person", persona_examples(split.train))
    requests: list[tuple[str, list[dict[str, str]]]] = []
    for sample in heldout:
        context = sample.messages[:-1]
        requests += [
            ("adapter", context),
            (BASE_ADAPTER, with_system(context, persona)),
            (BASE_ADAPTER, context),
        ]
    requests += [(BASE_ADAPTER, s.messages[:-1]) for s in base_train]
    params = GenerationParams(temperature=0.0, max_tokens=settings.reply_tokens, seed=settings.seed)
    texts = [t.strip() for t in _generate(backend, requests, params, settings.batch_size)]
    n = len(heldout)
    adapter_replies, prompted, base_heldout = texts[0 : 3 * n : 3], texts[1 : 3 * n : 3], texts[2 : 3 * n : 3]
    base_train_replies = texts[3 * n :]

    report["classifier_base_replies"] = base_train_replies
    classifier = StyleClassifier.fit(split.train, base_train_replies)
    if classifier is None:  # e.g. a base model that said nothing at all: nothing to tell apart
        return report
    real = [s.messages[-1]["content"] for s in heldout]
    test_texts, test_labels = _labelled(split.eval)
    test_texts += base_heldout
    test_labels += [BASE_CLASS] * len(base_heldout)
    report["style_match"] = {
        "adapter": classifier.person_share(adapter_replies),
        "prompted_base": classifier.person_share(prompted),
    }
    report["style_classifier_accuracy"] = classifier.accuracy(test_texts, test_labels)
    report["style_classifier"] = {"classes": classifier.classes, "test_messages": len(test_texts)}
    report["length"] = {
        "adapter": _mean_words(adapter_replies),
        "prompted_base": _mean_words(prompted),
        "person": _mean_words(real),
    }
    report["persona_prompt"] = persona
    report["examples"] = [
        {
            "context": _render_context(sample),
            "real": real[i],
            "adapter": adapter_replies[i],
            "prompted_base": prompted[i],
        }
        for i, sample in enumerate(heldout[: settings.examples])
    ]
    return report


class StyleClassifier:
    """Who wrote a message: the person, one of the other people, or the base model."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    @classmethod
    def fit(cls, train: Sequence[data.Sample], base_replies: Sequence[str]) -> StyleClassifier | None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        texts, labels = _labelled(train)
        texts += [t for t in base_replies if t]
        labels += [BASE_CLASS] * (len(texts) - len(labels))
        if len(set(labels)) < 2:
            return None
        pipeline = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=1),
            LogisticRegression(max_iter=2000, class_weight="balanced", C=10.0),
        )
        pipeline.fit(texts, labels)
        return cls(pipeline)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.pipeline.classes_]

    def predict(self, texts: Sequence[str]) -> list[str]:
        # An empty reply is nobody's style; the vectoriser would still place it somewhere.
        return [
            str(p) if t.strip() else ""
            for p, t in zip(self.pipeline.predict(list(texts)), texts, strict=True)
        ]

    def person_share(self, texts: Sequence[str]) -> float:
        predicted = self.predict(texts)
        return round(sum(p == PERSON_CLASS for p in predicted) / max(len(predicted), 1), 4)

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        predicted = self.predict(texts)
        return round(sum(p == y for p, y in zip(predicted, labels, strict=True)) / max(len(labels), 1), 4)


def report_classifier(adapter: Path, samples_path: Path) -> StyleClassifier | None:
    """The classifier of the adapter's eval.json, fitted again (the same data, so the same model), to
    attribute replies obtained elsewhere (a vLLM server, the bot)."""
    from transformers import AutoTokenizer

    report = json.loads((Path(adapter) / EVAL_FILE).read_text(encoding="utf-8"))
    config = _read_metrics(adapter).get("config") or {}
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"])
    split = split_samples(
        data.load_samples(samples_path),
        tokenizer,
        int(config.get("max_length", 1024)),
        float(config.get("eval_fraction", 0.1)),
        int(config.get("seed", 0)),
    )
    return StyleClassifier.fit(split.train, report.get("classifier_base_replies") or [])


def _labelled(samples: Sequence[data.Sample]) -> tuple[list[str], list[str]]:
    """Distinct real messages with their author class: the person's replies and the others' messages."""
    seen: dict[str, str] = {}
    for sample in samples:
        seen.setdefault(sample.messages[-1]["content"], PERSON_CLASS)
        for author, text in context_messages(sample):
            seen.setdefault(text, author)
    return list(seen), list(seen.values())


def _heldout_loss(
    backend: Any, split: SplitSamples, metrics: dict[str, Any], config: dict[str, Any]
) -> dict[str, float | None]:
    if metrics.get("base_eval_loss") is not None and metrics.get("eval_samples") == len(split.eval):
        return {"base": metrics["base_eval_loss"], "adapter": metrics.get("adapter_eval_loss")}
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
    with model.disable_adapter():
        base_loss = evaluate(model, batches, device)
    return {"base": base_loss, "adapter": adapter_loss}


def _generate(
    backend: Any, requests: list[tuple[str, list[dict[str, str]]]], params: Any, size: int
) -> list[str]:
    """Replies in request order, generated in batches of similar prompt length (less padding)."""
    lengths = [len(backend.render_prompt(m)) for _, m in requests]
    order = sorted(range(len(requests)), key=lengths.__getitem__)
    texts = [""] * len(requests)
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
    return "\n".join(m["content"] for m in sample.messages[1:-1])


def _mean_words(texts: Sequence[str]) -> float:
    return round(sum(words(t) for t in texts) / max(len(texts), 1), 1)


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
    match = report.get("style_match") or {}
    return {
        "heldout_loss_base": _round(loss.get("base")),
        "heldout_loss_adapter": _round(loss.get("adapter")),
        "style_match_adapter": match.get("adapter"),
        "style_match_prompted_base": match.get("prompted_base"),
        "style_classifier_accuracy": report.get("style_classifier_accuracy"),
        "heldout_samples": report.get("heldout_samples"),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def table(report: dict[str, Any]) -> str:
    """The short table `doppel eval` and `doppel local` print."""
    loss = report.get("heldout_loss") or {}
    lines = [f"fidelity on {report.get('heldout_samples', 0)} held-out samples (eval.json):"]
    base, tuned = loss.get("base"), loss.get("adapter")
    if base is not None and tuned is not None:
        change = (tuned - base) / base * 100 if base else 0.0
        lines.append(f"  held-out loss       base {base:.3f}  adapter {tuned:.3f}  ({change:+.0f}%)")
    match = report.get("style_match")
    if not match:
        lines.append("  style match         not measured (no held-out threads)")
        return "\n".join(lines)
    lines.append(
        f"  style match         adapter {match['adapter']:.2f}  persona-prompted base "
        f"{match['prompted_base']:.2f}  (classifier accuracy {report['style_classifier_accuracy']:.2f})"
    )
    length = report.get("length") or {}
    lines.append(
        f"  mean reply words    adapter {length.get('adapter')}  persona-prompted base "
        f"{length.get('prompted_base')}  real {length.get('person')}"
    )
    return "\n".join(lines)
