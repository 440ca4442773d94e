"""What `doppel train` runs around the fine-tuning: the person's memory and what they taught their doppel.

1. The memory index of the person's messages (`doppel.memory.index`) is built from memory.jsonl beside the
   samples (all their messages the scrape kept) and the samples.
2. The samples get their memory (retrieved from other, older conversations: `remember_samples`; a
   held-out sample only from the training split) and the person's corrections are added, weighted
   (`doppel.memory.feedback`), timed just before the held-out cut: always on the training side, and the
   newest a budget takes. They are written beside the samples as `samples.remembered.jsonl`, which the
   adapter trains and is evaluated on (the same prompt shape as serving). The corrections are scrubbed as
   the samples were (`corrections_scrubbed`: unless the scrape beside them says it kept everything).
3. The LoRA adapter is trained (`doppel.train.trainer`).
4. With enough corrections, preference tuning (`doppel.train.preference`) refines that adapter.
5. The index goes into the adapter directory (`ADAPTER/memory`), so it is versioned and removed with it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from doppel.errors import BadInput
from doppel.fsutil import atomic_write_text
from doppel.memory.feedback import FeedbackStore
from doppel.memory.index import MEMORY_DIR, MemoryIndex, person_entries, write_index
from doppel.memory.prompt import MemorySettings, remember_samples
from doppel.slack.samples import MEMORY_FILE, scraped_scrubbed
from doppel.train.preference import PreferenceConfig, prefer
from doppel.train.trainer import ProgressCallback, TrainConfig, train_adapter

REMEMBERED_FILE = "samples.remembered.jsonl"


@dataclass
class StageOptions:
    memory: bool = True
    feedback_dir: Path | None = None  # the doppel's data directory (holding feedback/), if any
    min_preference_pairs: int = 8
    settings: MemorySettings = field(default_factory=MemorySettings)


def train_stage(
    config: TrainConfig, options: StageOptions, on_progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Train `config.out` with memory and feedback; the summary's extra figures."""
    out = Path(config.out)
    if out.exists():
        raise BadInput(f"output directory already exists: {out}")
    records = _read(Path(config.data))
    person = _person(records)
    store = feedback_store(options.feedback_dir, config.data) if options.feedback_dir else None
    corrections = store.training_samples(person=person) if store else []
    staging = out.with_name(f".{out.name}.memory")
    shutil.rmtree(staging, ignore_errors=True)
    summary: dict[str, Any] = {"corrections": len(corrections)}
    trained = False
    try:
        cut = _heldout_cut(records, corrections, config.eval_fraction, staging.with_suffix(".cut"))
        if corrections and cut is not None:
            corrections = [_before(c, cut) for c in corrections]
        memory_file = Path(config.data).with_name(MEMORY_FILE)
        index = _index(records, memory_file, staging) if options.memory else None
        if index is not None:
            records, remembered = remember_samples(records, index, options.settings, heldout_from=cut)
            summary["memory"] = {"messages": len(index.entries), "samples_with_memory": remembered}
        data = Path(config.data)
        if index is not None or corrections:
            data = Path(config.data).with_name(REMEMBERED_FILE)
            lines = [json.dumps(r, ensure_ascii=False) for r in [*records, *corrections]]
            atomic_write_text(data, "\n".join(lines) + "\n")
        summary["metrics"] = train_adapter(replace(config, data=data), on_progress)
        trained = True
        summary["data"] = str(data)
        pairs = store.preference_pairs() if store else []
        if pairs:
            tuned = prefer(
                PreferenceConfig(
                    adapter=out,
                    base_model=config.base_model,
                    out=out,
                    min_pairs=options.min_preference_pairs,
                    max_length=config.max_length,
                    seed=config.seed,
                    device=config.device,
                ),
                pairs,
            )
            summary["preference"] = tuned.to_dict()
        if index is not None:
            os.replace(staging, out / MEMORY_DIR)
    except BaseException:
        # Preference tuning or the index failed (or the run was interrupted) after the adapter was written:
        # no adapter without its memory or its tuning, and the rerun (a Job's retry) may write `out` again.
        if trained:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def corrections_scrubbed(data: Path) -> bool:
    """Whether the person's corrections are scrubbed for training on the samples at `data`: as the scrape
    that wrote them (its manifest.json beside them) was. Only a scrape that says it kept everything
    (`--no-scrub`) keeps them as written; no manifest, or one that cannot be read, scrubs."""
    return scraped_scrubbed(Path(data).parent) is not False


def feedback_store(feedback_dir: Path, data: Path) -> FeedbackStore:
    """The doppel's feedback in `feedback_dir`, read back for training on the samples at `data`."""
    return FeedbackStore(feedback_dir, scrub=corrections_scrubbed(data))


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise BadInput(f"data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BadInput(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return records


def _heldout_cut(
    records: list[dict[str, Any]], corrections: list[dict[str, Any]], eval_fraction: float, scratch: Path
) -> float | None:
    """The time the trainer's split (`data.split_by_time`) will hold out from, on the samples with the
    corrections (counted, and placed before everything: they are never held out)."""
    from doppel.train.data import load_samples, split_by_time

    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines += [json.dumps(_before(c, 0.0), ensure_ascii=False) for c in corrections]
    try:
        atomic_write_text(scratch, "\n".join(lines) + "\n")
        return split_by_time(load_samples(scratch), eval_fraction).cut_ts
    except BadInput:
        return None  # the trainer says what is wrong with the samples
    finally:
        scratch.unlink(missing_ok=True)


def _before(correction: dict[str, Any], cut: float) -> dict[str, Any]:
    """The correction timed just before `cut`: trained on, never held out, and the newest a budget takes."""
    ts = max(cut - 1e-3, 0.0)
    return {**correction, "meta": {**correction["meta"], "ts": ts, "context_ts": ts}}


def _person(records: list[dict[str, Any]]) -> str | None:
    names = {(r.get("meta") or {}).get("person") for r in records if isinstance(r, dict)}
    return names.pop() if len(names) == 1 else None


def _index(records: list[dict[str, Any]], memory_file: Path, where: Path) -> MemoryIndex | None:
    """The person's index (`memory_file`'s messages and the samples'), or None when the samples do not say
    whose and where they are."""
    entries = person_entries((r for r in records if isinstance(r, dict)), memory_file)
    metas = [r.get("meta") or {} for r in records if isinstance(r, dict)]
    teams = {m.get("team") or "" for m in metas}
    people = {(m.get("user"), m.get("person")) for m in metas}
    if not entries or len(teams) != 1 or len(people) != 1:
        return None
    (person_id, person_name), team = people.pop(), teams.pop()
    write_index(entries, where, team=team, person_id=person_id or "", person_name=person_name or "")
    return MemoryIndex.load(where)
