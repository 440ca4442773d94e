"""Which of a person's local adapters is served, and the fidelity gate of `doppel local`.

A run that trains a new adapter (new messages, corrections, other settings) measures it on its held-out
replies, then measures the adapter served until now on the same replies (`eval-serving.json` beside the new
one, as `doppel train --compare-with` writes it for the operator). The new adapter is served only when
`doppel.train.gate.regressions` finds nothing worse beyond its tolerances, or when the user forces it
(`--force-promotion`); otherwise the old one keeps serving (chat, Socket Mode, the replies shown) and the new
one stays on disk beside it, so that rerunning with `--force-promotion` serves it without retraining.

    WORKDIR/adapters/USER/SERVING       the served adapter's directory name
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppel.fsutil import atomic_write_text
from doppel.local.settings import FINGERPRINT_FILE

SERVING_FILE = "SERVING"
SERVING_REPORT = "eval-serving.json"  # the serving adapter on the new adapter's held-out set


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on a newly trained adapter (`candidate`) against the one serving before it."""

    candidate: Path
    previous: Path | None  # None: nothing served before, the candidate is served
    regressions: list[str] = field(default_factory=list)  # "likeness 0.41 < 0.62 serving", ...
    forced: bool = False

    @property
    def promoted(self) -> bool:
        return self.previous is None or self.forced or not self.regressions

    @property
    def served(self) -> Path:
        return self.candidate if self.promoted or self.previous is None else self.previous

    def summary(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "candidate": str(self.candidate),
            "previous": str(self.previous) if self.previous else None,
            "regressions": self.regressions,
            "forced": self.forced and bool(self.regressions),
        }

    def line(self) -> str | None:
        """One sentence for the report when the gate found something worse; None otherwise."""
        if not self.regressions or self.previous is None:
            return None
        worse = "; ".join(self.regressions)
        if self.forced:
            return f"fidelity gate: serving the new adapter by --force-promotion although worse ({worse})"
        return (
            f"fidelity gate: NOT PROMOTED. The new adapter {self.candidate.name} is worse than the one "
            f"serving on the same held-out replies ({worse}); still serving {self.previous.name}. "
            "Rerun with --force-promotion to serve the new one anyway."
        )


def serving_adapter(adapters: Path) -> Path | None:
    """The adapter served now: the one SERVING names; in a work directory from before the gate (no SERVING
    file), its only adapter."""
    if not adapters.is_dir():
        return None
    marker = adapters / SERVING_FILE
    if marker.is_file():
        named = adapters / marker.read_text(encoding="utf-8").strip()
        return named if _complete(named) else None
    found = [p for p in adapters.iterdir() if _complete(p)]
    return found[0] if len(found) == 1 else None


def serve(adapters: Path, decision: Decision) -> None:
    """Record the served adapter and delete the others but a refused candidate (kept for
    --force-promotion)."""
    served = decision.served
    atomic_write_text(adapters / SERVING_FILE, served.name + "\n")
    keep = {served, decision.candidate}
    for old in adapters.iterdir():
        if old.is_dir() and old not in keep and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


def serving_report(
    base_model: Path, previous: Path, candidate: Path, trained_on: Path, new: dict[str, Any]
) -> dict[str, Any]:
    """The previous adapter's fidelity report on the candidate's held-out set (`new`: the candidate's
    report): CANDIDATE/eval-serving.json, computed once."""
    existing = candidate / SERVING_REPORT
    if existing.is_file():
        report: dict[str, Any] = json.loads(existing.read_text(encoding="utf-8"))
        if report.get("adapter") == str(previous):
            return report
    from doppel.train.fidelity import evaluate_serving

    report = evaluate_serving(base_model, previous, candidate, trained_on, new)
    atomic_write_text(existing, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def decide(
    candidate: Path, previous: Path | None, new: dict[str, Any], old: dict[str, Any] | None, forced: bool
) -> Decision:
    """The gate on the two reports (`doppel.train.fidelity` reports, the same held-out set)."""
    from doppel.train.fidelity import headline, paired
    from doppel.train.gate import regressions

    if previous is None or previous == candidate or old is None:
        return Decision(candidate, None)
    return Decision(candidate, previous, regressions(headline(new), headline(old), paired(new, old)), forced)


def comparable(previous: Path, candidate: Path) -> bool:
    """Whether the gate can weigh `candidate` against `previous`: both adapters of the same base model (an
    adapter of another base cannot serve beside the new one; switching `--base-model` starts afresh)."""
    return _base_model(previous) == _base_model(candidate)


def _base_model(adapter: Path) -> str | None:
    record = adapter / FINGERPRINT_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8")).get("base_model")


def _complete(adapter: Path) -> bool:
    return (adapter / "adapter_config.json").is_file() and (adapter / "metrics.json").is_file()
