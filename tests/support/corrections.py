"""The person corrects their doppel the way the bot records it, and the next training learns it.

`run(base_model, workdir, ...)`: the demo workspace's person (Margaret, who ends every message with
"Kind regards, Margaret") is scraped and trained on (v1); v1 answers `corrected` contexts of her threads;
she corrects each reply, the same words without the sign-off (she never signs off any more), through the
doppel's feedback store as the bot's "Correct this" modal writes it; v2 is trained with those corrections
(`doppel train --feedback-from`: weighted samples, then DPO). Both adapters then answer other contexts,
never corrected, greedily: the share of replies that sign off, before and after, is the measure.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from doppel.cli import main
from doppel.demo.workspace import EXPORTED_AT, MARGARET, SIGN_OFF, write_export
from doppel.memory.feedback import FeedbackStore
from doppel.slack.export import scrape_export
from doppel.slack.samples import ScrapeOptions

SIGN_OFF_MARK = "regards"  # the sign-off's word a reply that signs off holds, also when the model trims it


@dataclass
class Outcome:
    corrected: int
    measured: int
    signs_off_before: float
    signs_off_after: float
    result: dict[str, Any] = field(default_factory=dict)  # v2's `doppel train` result
    seconds: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)


def signs_off(text: str) -> bool:
    return SIGN_OFF_MARK in text.casefold()


def without_sign_off(text: str) -> str:
    """The reply as the person writes now: the sign-off line gone."""
    lines = [line for line in text.splitlines() if not signs_off(line)]
    return "\n".join(lines).strip()


def demo_samples(workdir: Path) -> Path:
    export = write_export(workdir / "workspace.zip")
    options = ScrapeOptions(cutoff_days=3650, min_length=20, now=EXPORTED_AT.timestamp())
    scrape_export(export, MARGARET.name, workdir / "data", options)
    return workdir / "data" / "samples.jsonl"


def train(samples: Path, base_model: Path, out: Path, args: list[str], result: Path) -> dict[str, Any]:
    """`doppel train` as a user runs it."""
    command = ["train", "--data", str(samples), "--base-model", str(base_model), "--out", str(out), *args]
    outcome = CliRunner().invoke(main, command, env={"DOPPEL_RESULT_FILE": str(result)})
    assert outcome.exit_code == 0, outcome.output
    return json.loads(result.read_text())


def answer(base_model: Path, adapter: Path, contexts: list[list[dict[str, str]]], tokens: int) -> list[str]:
    from doppel.serve.backend import GenerationParams
    from doppel.serve.local import LocalBackend

    backend = LocalBackend(base_model, {"v": adapter})
    params = GenerationParams(temperature=0.0, max_tokens=tokens, seed=0)
    texts: list[str] = []
    for start in range(0, len(contexts), 16):
        texts += backend.complete_batch([("v", c) for c in contexts[start : start + 16]], params)
    return [t.strip() for t in texts]


def pick_threads(
    remembered: Path, corrected: int, measured: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Samples (the shape the adapter trained on and serves: memory in the system prompt) of distinct
    threads: `corrected` from the oldest, `measured` from the newest, apart."""
    records = [json.loads(line) for line in remembered.open()]
    records = [r for r in records if r["meta"].get("kind", "reply") == "reply" and "ts" in r["meta"]]
    records.sort(key=lambda r: float(r["meta"]["ts"]))
    threads: dict[str, dict[str, Any]] = {}
    for record in records:
        threads.setdefault(f"{record['meta'].get('channel_id')}/{record['meta'].get('thread_ts')}", record)
    firsts = list(threads.values())
    assert len(firsts) >= corrected + measured, len(firsts)
    return firsts[:corrected], firsts[-measured:]


def correct(
    store: FeedbackStore, base_model: Path, adapter: Path, samples: list[dict[str, Any]], reply_tokens: int
) -> None:
    """The doppel (`adapter`) answers each sample's context, as the bot records it; the person corrects
    each reply, as the "Correct this" modal stores it: the same words, no sign-off."""
    contexts = [r["messages"][:-1] for r in samples]
    replies = answer(base_model, adapter, contexts, reply_tokens)
    for i, (context, reply) in enumerate(zip(contexts, replies, strict=True)):
        ts = f"{int(EXPORTED_AT.timestamp()) + 60 * i}.000100"
        store.record_reply(ts, messages=context, reply=reply, adapter=adapter.name)
        real = samples[i]["messages"][-1]["content"]
        store.correct(ts, MARGARET.id, without_sign_off(reply) or without_sign_off(real))


def run(
    base_model: Path,
    workdir: Path,
    train_args: list[str],
    *,
    corrected: int = 20,
    measured: int = 20,
    reply_tokens: int = 120,
) -> Outcome:
    seconds: dict[str, float] = {}
    samples = demo_samples(workdir)
    started = time.perf_counter()
    train(samples, base_model, workdir / "v1", train_args, workdir / "v1.json")
    seconds["train_v1"] = time.perf_counter() - started
    to_correct, to_measure = pick_threads(samples.with_name("samples.remembered.jsonl"), corrected, measured)
    started = time.perf_counter()
    store = FeedbackStore(workdir / "doppel")
    correct(store, base_model, workdir / "v1", to_correct, reply_tokens)
    measure = [r["messages"][:-1] for r in to_measure]
    before = answer(base_model, workdir / "v1", measure, reply_tokens)
    seconds["correct_and_measure_v1"] = time.perf_counter() - started

    started = time.perf_counter()
    result = train(
        samples,
        base_model,
        workdir / "v2",
        [*train_args, "--feedback-from", str(workdir / "doppel")],
        workdir / "v2.json",
    )
    seconds["train_v2"] = time.perf_counter() - started
    started = time.perf_counter()
    after = answer(base_model, workdir / "v2", measure, reply_tokens)
    seconds["measure_v2"] = time.perf_counter() - started
    examples = [{"before": b, "after": a} for b, a in list(zip(before, after, strict=True))[:3]]
    return Outcome(
        corrected=len(store.corrections()),
        measured=len(measure),
        signs_off_before=sum(map(signs_off, before)) / len(before),
        signs_off_after=sum(map(signs_off, after)) / len(after),
        result=result,
        seconds=seconds,
        examples=examples,
    )


__all__ = ["SIGN_OFF", "Outcome", "run", "signs_off", "without_sign_off"]
