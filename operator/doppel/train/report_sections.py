"""Sections that reports other than the fidelity report add to an adapter's `eval.json` (the memory
figures, the corrected contexts), and the replies they measure."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doppel.fsutil import atomic_write_text

EVAL_FILE = "eval.json"


def report_params(tokens: int, seed: int) -> Any:
    """How reports reply: as doppels are served, an opening sampled at OPENING_TEMPERATURE, but greedy after
    it instead of at the serving temperature, and seeded: a figure reproducible from the same adapter."""
    from doppel.serve.backend import OPENING_TEMPERATURE, GenerationParams

    return GenerationParams(
        temperature=0.0, max_tokens=tokens, seed=seed, opening_temperature=OPENING_TEMPERATURE
    )


def add_section(adapter: Path, key: str, figures: dict[str, Any] | None) -> None:
    """Put `figures` into ADAPTER/eval.json under `key`, keeping what is there."""
    path = Path(adapter) / EVAL_FILE
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    report[key] = figures
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def report_replies(
    backend: Any, contexts: Sequence[list[dict[str, str]]], tokens: int, batch_size: int = 16
) -> list[str]:
    """The adapter's reply to each context (`backend` serves it as "adapter"), in batches, decoded as
    reports decode (`report_params`)."""
    params = report_params(tokens, seed=0)
    replies: list[str] = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        replies += [t.strip() for t in backend.complete_batch([("adapter", c) for c in chunk], params)]
    return replies
