"""What the person taught their doppel, measured on the contexts they corrected.

For each correction in the doppel's feedback store (`doppel.memory.feedback`), the new adapter (trained with
the corrections) answers the corrected context again, greedily; the figure is the share of contexts where
its reply is closer to the person's correction than the reply they corrected (what the old adapter did
write, as stored: the old adapter may be gone). Closeness is difflib's ratio on case-folded,
whitespace-normalised text: a character-level similarity that sees a dropped sign-off or a changed phrasing,
with no model of its own. A tie (the same reply again) is not closer.

eval.json gains `corrected_contexts` (`add_to_report`):

    {contexts, closer, similarity_before, similarity_after, examples: [{correction, before, after}]}
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doppel.memory.feedback import FeedbackStore
from doppel.train.report_sections import add_section, report_replies

REPORT_KEY = "corrected_contexts"
EXAMPLES = 3


def similarity(a: str, b: str) -> float:
    """difflib's ratio of the two texts, case-folded, whitespace normalised."""
    a, b = (" ".join(t.split()).casefold() for t in (a, b))
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def closer_share(corrections: Sequence[str], before: Sequence[str], after: Sequence[str]) -> dict[str, Any]:
    """The figures of `corrected_contexts` from the three aligned lists."""
    n = len(corrections)
    old = [similarity(b, c) for b, c in zip(before, corrections, strict=True)]
    new = [similarity(a, c) for a, c in zip(after, corrections, strict=True)]
    return {
        "contexts": n,
        "closer": round(sum(y > x for x, y in zip(old, new, strict=True)) / n, 4) if n else None,
        "similarity_before": round(sum(old) / n, 4) if n else None,
        "similarity_after": round(sum(new) / n, 4) if n else None,
    }


def corrected_contexts(
    base_model: Path, adapter: Path, store: FeedbackStore, *, reply_tokens: int = 64, batch_size: int = 16
) -> dict[str, Any] | None:
    """The figure for `adapter` (None when the person corrected nothing)."""
    corrected = store.corrections()
    if not corrected:
        return None
    from doppel.serve.local import LocalBackend

    backend = LocalBackend(Path(base_model), {"adapter": Path(adapter)}, bf16=False)  # as the report
    after = report_replies(backend, [c["messages"] for c in corrected], reply_tokens, batch_size)
    texts, before = [c["text"] for c in corrected], [c["reply"] for c in corrected]
    figures = closer_share(texts, before, after)
    figures["examples"] = [
        {"correction": t, "before": b, "after": a}
        for t, b, a in list(zip(texts, before, after, strict=True))[:EXAMPLES]
    ]
    return figures


def add_to_report(adapter: Path, figures: dict[str, Any] | None) -> None:
    """Put `figures` into ADAPTER/eval.json (written by the fidelity report) under `corrected_contexts`."""
    add_section(adapter, REPORT_KEY, figures)


def table_line(figures: dict[str, Any] | None) -> str | None:
    """The printed report's line, or None without corrections."""
    if not figures or not figures.get("contexts"):
        return None
    return (
        f"  corrected contexts  {figures['closer']:.0%} of {figures['contexts']} answered closer to the "
        f"person's correction than before (similarity {figures['similarity_before']:.2f} -> "
        f"{figures['similarity_after']:.2f})"
    )
