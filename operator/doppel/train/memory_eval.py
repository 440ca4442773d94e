"""eval.json's memory figures: does memory bring the person's own answers into the replies, and does the
doppel abstain where it should?

On the training's held-out split (`data.split_by_time` at the adapter's recorded `eval_fraction`), with an
index of the person's messages before its cut only (memory.jsonl's and the samples': nothing held out is
ever retrieved):

- the held-out questions are those the person answered after the cut: in a held-out sample (asked with
  its prompt and the memory it holds, retrieved from the training split as serving retrieves), or in a
  message of memory.jsonl too short to be a sample (the question alone, with the memory retrieved for
  it). Those with a basis (`doppel.memory.heldout`: the person's real reply shares specific terms with
  one of their earlier messages), up to `QUESTIONS` (their prompts clipped of the oldest lines to fit the
  training's `max_length`, as the report clips a held-out context), are answered greedily by the adapter
  twice: with that memory and with the plain system prompt (the adapter alone). `contains_answer`: the
  share of replies holding the answer; `retrieved_answer`: the share of those questions whose memory holds
  it (what retrieval put within the model's reach: below it, memory cannot help; above it and no better
  with memory than without, the model does not use what it is given);
- `abstain`: the share of those questions the doppel would abstain on (`with_basis`), of every question
  colleagues asked the person after the cut (`asked`: what abstention costs in their own workspace), and
  of questions of another workspace (`no_basis`: `heldout.foreign_questions`, none for the demo
  workspace's own person).

eval.json gains (`add_to_report`; null figures when there is nothing to measure):

    memory  {questions, contains_answer: {with_memory, without_memory}, retrieved_answer,
             abstain: {with_basis, asked, no_basis}, asked_questions, no_basis_questions, min_support,
             min_relatedness, replied,
             examples: [{question, answer, real, with_memory, without_memory}]}
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from doppel.memory.heldout import (
    Basis,
    Earlier,
    asked,
    contains_answer,
    foreign_questions,
    memory_holds_answer,
)
from doppel.memory.index import Entry, MemoryIndex, asked_question, is_question, person_entries, write_index
from doppel.memory.prompt import DEFAULT_SETTINGS, MemorySettings, query
from doppel.slack.conversation import system_prompt
from doppel.slack.samples import MEMORY_FILE
from doppel.train import data
from doppel.train.fidelity import clipped
from doppel.train.report_sections import add_section, report_replies

REPORT_KEY = "memory"
QUESTIONS = 16  # answered twice each: a bounded cost on CPU
EXAMPLES = 3


def memory_figures(
    base_model: Path,
    adapter: Path,
    samples_path: Path,
    config: dict[str, Any],
    *,
    settings: MemorySettings = DEFAULT_SETTINGS,
    questions: int = QUESTIONS,
    reply_tokens: int = 64,
) -> dict[str, Any] | None:
    """The figures (see the module docstring), or None when the samples hold no person's messages."""
    records = [
        json.loads(line) for line in Path(samples_path).read_text(encoding="utf-8").splitlines() if line
    ]
    samples = data.load_samples(samples_path)
    split = data.split_by_time(samples, float(config.get("eval_fraction", 0.15)))
    cut = split.cut_ts if split.cut_ts is not None else float("inf")
    scraped = [r for r in records if (r.get("meta") or {}).get("source") != "correction"]
    remembered = person_entries(scraped, Path(samples_path).with_name(MEMORY_FILE))
    entries = [e for e in remembered if float(e.ts) < cut]
    metas = [r.get("meta") or {} for r in scraped]
    if not entries or not metas:
        return None
    meta = metas[0]
    person = str(meta.get("person") or "")
    with tempfile.TemporaryDirectory(prefix="doppel-memory-eval-") as scratch:
        where = write_index(
            entries,
            Path(scratch) / "memory",
            team=str(meta.get("team") or ""),
            person_id=str(meta.get("user") or ""),
            person_name=person,
        )
        index = MemoryIndex.load(where)
    earlier = Earlier([e.text for e in index.entries], index.stemmer)
    held = {s.ts: s for s in split.eval}
    based = [
        found
        for entry in remembered
        if float(entry.ts) >= cut and (found := _with_basis(entry, held, index, earlier, settings, person))
    ]
    foreign = foreign_questions(str(meta.get("team") or ""))
    asked_later = [asked_question(e) for e in remembered if float(e.ts) >= cut and e.answered]
    later = [q for q in asked_later if is_question(q)]
    figures: dict[str, Any] = {
        "questions": len(based),
        "contains_answer": {"with_memory": None, "without_memory": None},
        "retrieved_answer": None,
        "abstain": {
            "with_basis": _abstained(index, [b.question for _, b in based], settings),
            "asked": _abstained(index, later, settings),
            "no_basis": _abstained(index, foreign, settings),
        },
        "asked_questions": len(later),
        "no_basis_questions": len(foreign),
        "min_support": settings.min_support,
        "min_relatedness": settings.min_relatedness,
        "examples": [],
    }
    if not based:
        return figures
    from doppel.serve.local import LocalBackend

    backend = LocalBackend(Path(base_model), {"adapter": Path(adapter)}, bf16=False)  # as the report
    limit = int(config.get("max_length", 1024)) - reply_tokens
    chosen = _spread(based, questions)
    # Prompted as the report prompts a held-out context: clipped of its oldest lines, as training clips.
    with_memory = [clipped(m, backend.prompt_token_ids, limit) for m, _ in chosen]
    plain = [[{"role": "system", "content": system_prompt(person)}, *m[1:]] for m in with_memory]
    texts = report_replies(backend, [*with_memory, *plain], reply_tokens)
    helped, alone = texts[: len(chosen)], texts[len(chosen) :]
    answers = [b for _, b in chosen]

    def holding(replies: list[str]) -> float | None:
        return _share([contains_answer(t, b, index.stemmer) for t, b in zip(replies, answers, strict=True)])

    figures["contains_answer"] = {"with_memory": holding(helped), "without_memory": holding(alone)}
    figures["retrieved_answer"] = _share(
        [memory_holds_answer(m, b, index.stemmer) for m, b in zip(with_memory, answers, strict=True)]
    )
    figures["replied"] = len(chosen)
    figures["examples"] = [
        {
            "question": b.question,
            "answer": list(b.answer),
            "real": b.reply,
            "with_memory": r,
            "without_memory": a,
        }
        for (_, b), r, a in list(zip(chosen, helped, alone, strict=True))[:EXAMPLES]
    ]
    return figures


def _with_basis(
    entry: Entry,
    held: dict[float, data.Sample],
    index: MemoryIndex,
    earlier: Earlier,
    settings: MemorySettings,
    person: str,
) -> tuple[list[dict[str, str]], Basis] | None:
    """A message the person wrote after the cut, as a question with a basis: the prompt that asks it (its
    held-out sample's, with the memory it holds; else the question alone, with the memory retrieved for it)
    and its basis; None when it answers no question, or one without a basis."""
    sample = held.get(float(entry.ts))
    if sample is not None:
        question = asked(sample.messages) if sample.kind == "reply" else None
        basis = earlier.basis(question, sample.reply) if question else None
        return (sample.messages[:-1], basis) if basis else None
    _, said, question = entry.answered.partition(": ")
    if not said or not is_question(question):
        return None
    basis = earlier.basis(question, entry.text)
    if basis is None:
        return None
    found = index.search(
        query(question),
        k=settings.k,
        budget_tokens=settings.budget_tokens,
        min_coverage=settings.min_coverage,
    )
    prompt = [
        {"role": "system", "content": system_prompt(person, memory=found.lines())},
        {"role": "user", "content": entry.answered},
    ]
    return prompt, basis


def _abstained(index: MemoryIndex, questions: list[str], settings: MemorySettings) -> float | None:
    """The share of `questions` the doppel abstains on, among those it judges (two content words or more)."""
    judged = [
        index.search(query(q), min_support=settings.min_support, min_relatedness=settings.min_relatedness)
        for q in questions
    ]
    judged = [r for r in judged if r.support is not None]
    return _share([r.abstain for r in judged])


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _spread(items: list[Any], count: int) -> list[Any]:
    """At most `count` of `items` (in time order), evenly spaced over the held-out period."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def add_to_report(adapter: Path, figures: dict[str, Any] | None) -> None:
    """Put `figures` into ADAPTER/eval.json under `memory`."""
    add_section(adapter, REPORT_KEY, figures)


def table_lines(figures: dict[str, Any] | None) -> list[str]:
    """The printed report's lines."""
    if not figures:
        return []
    answer, abstain = figures["contains_answer"], figures["abstain"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    return [
        f"  memory              answer in the reply on {figures.get('replied', 0)} held-out questions with a "
        f"basis: with memory {pct(answer['with_memory'])}, adapter alone {pct(answer['without_memory'])} "
        f"(the memory retrieved holds it for {pct(figures.get('retrieved_answer'))})",
        f"  abstention          on questions with a basis {pct(abstain['with_basis'])}, all asked after the "
        f"cut {pct(abstain.get('asked'))}, another workspace's {pct(abstain['no_basis'])} (min support "
        f"{figures['min_support']:+.2f}, min relatedness {figures.get('min_relatedness', 0):.2f})",
    ]
