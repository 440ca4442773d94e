"""What a run of `doppel local` produced (the adapter, its metrics, the replies to a few questions) and the
report printed from it: the replies side by side, the held-out loss and the fidelity table."""

from __future__ import annotations

import itertools
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from doppel.local.serving import Decision


@dataclass(frozen=True)
class Question:
    asker_id: str
    asker_name: str
    text: str


@dataclass(frozen=True)
class Reply:
    question: Question
    adapter: str
    base: str
    real: str | None = None  # what the person actually replied (a held-out context of the workspace)


@dataclass
class Outcome:
    """What a run produced; `summary()` is the CLI's result."""

    person_id: str
    person_name: str
    handle: str  # the --user given (demo: margaret); names the doppel in Slack
    samples: int
    added_samples: int
    base_model: Path
    adapter: Path
    trained: bool
    metrics: dict[str, Any]
    replies: list[Reply] = field(default_factory=list)
    fidelity: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None  # the person's data: samples, and the feedback the local bot keeps
    gate: Decision | None = None  # the fidelity gate's verdict on this run's adapter (None: not reached)

    def summary(self) -> dict[str, Any]:
        return {
            "person": self.person_id,
            "samples": self.samples,
            "added_samples": self.added_samples,
            "adapter": str(self.adapter),
            "trained": self.trained,
            "steps": self.metrics.get("steps"),
            "base_eval_loss": self.metrics.get("base_eval_loss"),
            "adapter_eval_loss": self.metrics.get("adapter_eval_loss"),
            "eval": headline_of(self.fidelity),
            "gate": self.gate.summary() if self.gate is not None else None,
        }


def headline_of(report: dict[str, Any]) -> dict[str, Any] | None:
    """The report's headline figures (`doppel.train.fidelity.headline`); None without a report."""
    from doppel.train.fidelity import headline

    return headline(report) if report else None


def report(outcome: Outcome, width: int = 100) -> str:
    """The replies side by side (adapter left, persona-prompted base model right), then the fidelity table."""
    column = (width - 3) // 2
    lines = [
        f"doppel of {outcome.person_name} ({outcome.person_id}): {outcome.samples} samples, "
        f"adapter {outcome.adapter}",
        "",
    ]
    if outcome.gate is not None and (line := outcome.gate.line()):
        lines += [*_wrap(line, width), ""]
    for reply in outcome.replies:
        lines.append(f"{reply.question.asker_name}: {reply.question.text}")
        if reply.real is not None:
            lines += [
                f"  {line}" for line in _wrap(f"real reply of {outcome.person_name}: {reply.real}", width - 2)
            ]
        lines.append(
            f"{f'adapter ({outcome.person_name})':<{column}} | base model, persona prompt (no adapter)"
        )
        lines.append(f"{'-' * column}-+-{'-' * column}")
        for left, right in itertools.zip_longest(
            _wrap(reply.adapter, column), _wrap(reply.base, column), fillvalue=""
        ):
            lines.append(f"{left:<{column}} | {right}".rstrip())
        lines.append("")
    lines.append(loss_line(outcome.metrics))
    if outcome.fidelity:
        from doppel.train.fidelity import table
        from doppel.train.memory_eval import table_lines

        lines.append(table(outcome.fidelity))
        lines += table_lines(outcome.fidelity.get("memory"))
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    wrapped: list[str] = []
    for paragraph in (text.strip() or "(empty reply)").splitlines():
        wrapped += textwrap.wrap(paragraph, width) or [""]
    return wrapped


def loss_line(metrics: dict[str, Any]) -> str:
    base, tuned = metrics.get("base_eval_loss"), metrics.get("adapter_eval_loss")
    if base is None or tuned is None:
        return "held-out loss: not measured (too few threads to hold any out)"
    change = (tuned - base) / base * 100 if base else 0.0
    return (
        f"held-out loss on unseen threads ({metrics.get('eval_samples', '?')} samples): "
        f"base model {base:.3f} -> adapter {tuned:.3f} ({change:+.0f}%), "
        f"after {metrics.get('steps', '?')} steps"
    )
