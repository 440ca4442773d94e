"""Benchmark: what the fidelity gate adds to a retraining, its measure of the serving adapter.

A retraining over a serving adapter measures that adapter on the new one's held-out replies
(`eval-serving.json`). The persona-prompted base model's and the plain base model's replies, and the base
model's held-out loss, are the same for both adapters; `fidelity.evaluate_serving` takes them from the new
adapter's report and generates only the serving adapter's replies. The baseline is that same measure
computed whole (`evaluate_adapter` with the new training's split, as before): both in this process, on the
same two adapters, one after the other, and their headline figures compared (they must agree).

The adapters: SmolLM2-135M-Instruct (the built-in model) on the demo workspace, by `doppel local --demo`:
a first run serves an adapter, a second with other steps trains its successor and runs the gate.

Run: .venv/bin/python tests/bench/bench_gate.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))

from doppel.local.serving import SERVING_FILE
from doppel.train.base_models import ensure_builtin
from doppel.train.fidelity import evaluate_adapter, evaluate_serving, headline
from doppel.train.stage import REMEMBERED_FILE

PERSON = "margaret"


def local(workdir: Path, *args: str) -> dict:
    result = workdir.parent / "result.json"
    env = {**os.environ, "DOPPEL_RESULT_FILE": str(result), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "doppel.cli", "local", "--demo", "--workdir", str(workdir), *args]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"doppel local failed: {run.stderr[-2000:]}")
    return json.loads(result.read_text())


def main() -> None:
    base_model = ensure_builtin("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "doppel-data"
        first = Path(local(workdir, "--max-steps", "8")["adapter"])
        serving = Path(tmp) / "serving"  # a copy: a promoted successor deletes the first adapter
        shutil.copytree(first, serving)
        candidate = Path(local(workdir, "--max-steps", "6")["gate"]["candidate"])
        assert (workdir / "adapters" / PERSON / SERVING_FILE).is_file() and first != candidate
        data = workdir / "data" / PERSON
        trained_on = data / REMEMBERED_FILE if (data / REMEMBERED_FILE).is_file() else data / "samples.jsonl"
        config = json.loads((candidate / "metrics.json").read_text())["config"]
        new = json.loads((candidate / "eval.json").read_text())

        started = time.perf_counter()
        whole = evaluate_adapter(base_model, serving, trained_on, split_config=config)
        whole_s = time.perf_counter() - started
        started = time.perf_counter()
        reused = evaluate_serving(base_model, serving, candidate, trained_on, new)
        reused_s = time.perf_counter() - started

    replies = reused["replies"]
    generated = 2 * replies + len(reused["baseline"]["base"])
    print(f"the serving adapter measured on its successor's {replies} held-out contexts (SmolLM2-135M, demo)")
    print(f"  whole report (baseline)             {whole_s:7.1f} s  ({generated} replies)")
    print(f"  reusing the successor's baseline    {reused_s:7.1f} s  ({replies} replies)")
    print(f"  ratio                               {whole_s / reused_s:7.2f}x faster")
    a, b = headline(whole), headline(reused)
    for key in ("heldout_loss_adapter", "likeness_adapter", "relevance_adapter", "distinct_adapter"):
        print(f"  {key:34s}  whole {a[key]}  reused {b[key]}")


if __name__ == "__main__":
    main()
