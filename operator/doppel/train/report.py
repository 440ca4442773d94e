"""Training metrics: what metrics.json holds, and the summary the CLI reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def perplexity(loss: float | None) -> float | None:
    """exp(loss), capped so a diverged run still serialises as a number."""
    return None if loss is None else math.exp(min(loss, 50.0))


@dataclass
class Metrics:
    person: str | None = None  # whose doppel this is, from the samples (doppel chat's default --person)
    samples: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    heldout: dict[str, Any] = field(default_factory=dict)  # the split by time (data.SampleSplit.summary)
    # Samples whose oldest context was clipped to fit --max-length, those whose reply was too (its
    # beginning kept), and those too long even then.
    clipped: int = 0
    reply_cut: int = 0
    dropped_too_long: int = 0
    # Tokens fed to the model (prompt and reply), and the assistant tokens the loss was taken on.
    tokens: int = 0
    label_tokens: int = 0
    padding_tokens: int = 0  # pad positions computed but masked out
    steps: int = 0
    total_steps: int = 0
    epochs: float = 0.0
    best_step: int = 0
    stopped_early: bool = False
    train_loss: list[dict[str, float]] = field(default_factory=list)
    eval_loss: list[dict[str, float]] = field(default_factory=list)
    base_eval_loss: float | None = None
    adapter_eval_loss: float | None = None
    base_perplexity: float | None = None
    adapter_perplexity: float | None = None
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    wall_time_s: float = 0.0
    peak_memory_bytes: int = 0
    device: str = ""
    dtype: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The few figures worth a result file / status line."""
        return {
            "samples": self.samples,
            "steps": self.steps,
            "best_step": self.best_step,
            "base_eval_loss": self.base_eval_loss,
            "adapter_eval_loss": self.adapter_eval_loss,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "wall_time_s": round(self.wall_time_s, 2),
        }
