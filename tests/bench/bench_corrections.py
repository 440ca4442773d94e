"""Benchmark: twenty consistent corrections on the demo workspace, and what the retrained adapter does.

Margaret signs off every message ("Kind regards, Margaret"); she corrects twenty of her doppel's replies,
dropping the sign-off, through the feedback store the bot writes; the next `doppel train --feedback-from`
(weighted corrections, then DPO) is measured on twenty other threads: the share of replies that sign off,
before and after, and eval.json's corrected-contexts figure (see tests/support/corrections.py).

Run: .venv/bin/python tests/bench/bench_corrections.py [smollm2 | tiny]
(SmolLM2-135M at the demo's CPU budget: 16 optimizer steps of 8 samples a training; tiny: the tiny model.)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT)]

from tests.support.corrections import run  # noqa: E402

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
SMOLLM2_ARGS = [
    *("--rank", "16", "--alpha", "32", "--dropout", "0", "--lr", "1e-3", "--batch-size", "8"),
    *("--grad-accum", "1", "--max-length", "512", "--early-stopping-patience", "100"),
    *("--epochs", "2", "--max-steps-per-epoch", "8"),
]
TINY_ARGS = [
    *("--rank", "16", "--alpha", "32", "--dropout", "0", "--lr", "3e-3", "--batch-size", "8"),
    *("--grad-accum", "1", "--max-length", "384", "--early-stopping-patience", "100", "--epochs", "4"),
]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-corrections-"))
    try:
        if MODEL == "tiny":
            from doppel.train.tiny import make_tiny_model

            base, args = make_tiny_model(work / "tiny"), TINY_ARGS
        else:
            from doppel.train.base_models import ensure_builtin

            base, args = ensure_builtin("smollm2-135m"), SMOLLM2_ARGS
        started = time.perf_counter()
        outcome = run(base, work, args)
        wall = time.perf_counter() - started
        print(f"{MODEL}: {outcome.corrected} corrections, {outcome.measured} other threads measured")
        print(
            f"replies signing off: {outcome.signs_off_before:.0%} before, "
            f"{outcome.signs_off_after:.0%} after the corrections"
        )
        figures = json.loads((work / "v2" / "eval.json").read_text()).get("corrected_contexts") or {}
        print(
            f"corrected contexts answered closer to the correction: {figures.get('closer')} "
            f"(similarity {figures.get('similarity_before')} -> {figures.get('similarity_after')})"
        )
        print(f"preference: {json.dumps(outcome.result.get('preference'))}")
        seconds = json.dumps({k: round(v, 1) for k, v in outcome.seconds.items()})
        print(f"seconds: {seconds}, wall {wall:.0f} s, load average {os.getloadavg()[0]:.2f}")
        for example in outcome.examples:
            print(f"  before: {example['before']!r}\n  after:  {example['after']!r}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
