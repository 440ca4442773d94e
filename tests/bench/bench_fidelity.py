"""Benchmark: fidelity on real people, the figures the fidelity targets are stated in, on any export.

For each export with volume in `../shared/real-exports` (or each `--export ZIP`), its most active people
(`--people`, 5 by default: the most human messages, by user ID), and the demo's Margaret: `doppel local
--export ZIP --user ID` with its defaults, in a fresh work directory, one run at a time, as a newcomer runs
it. Each run is a whole first run (workspace, scrape, train, fidelity report, replies); the row is read from
the report it writes (eval.json, metrics.json, the scrape's manifest) and from the run itself (wall time,
peak resident memory of the process).

Prints one row per person, in the form of docs/fidelity.md's tables, each figure against its baseline of the
same run (the held-out loss as a change from the base model's, the likeness beside the persona-prompted base's
and the real replies' own), then how many people meet each target:

- held-out loss at least 20% below the base model's;
- likeness at least 0.9 of the real replies' and at least 0.2 above the persona-prompted base's;
- relevance above the persona-prompted base's; distinct at least 0.75; copy rate at most 0.10;
- at most 8 minutes and 6 GB (a CPU budget's run; the demo's too).

About 6 to 8 minutes a person on 2 cores. A run that fails is a row with its one-line reason.

Run: .venv/bin/python tests/bench/bench_fidelity.py [--people N] [--export ZIP ...] [--no-demo] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT))

from tests.support.real_exports import REAL_EXPORTS, most_active, volume_exports  # noqa: E402

LOSS_TARGET = -20.0  # percent change from the base model's held-out loss
LIKENESS_OF_REAL = 0.9
LIKENESS_OVER_PROMPTED = 0.2
DISTINCT_TARGET = 0.75
COPY_TARGET = 0.10
WALL_TARGET_S = 8 * 60
PEAK_TARGET_BYTES = 6 * 10**9
DEMO = "demo"


@dataclass
class Row:
    export: str
    person: str
    figures: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


def run_local(args: list[str], workdir: Path) -> tuple[int, str, float, int]:
    """`doppel local ARGS --workdir WORKDIR`: exit code, the output's last line, wall seconds, peak RSS."""
    command = [sys.executable, "-m", "doppel.cli", "local", *args, "--workdir", str(workdir)]
    log = workdir.parent / f"{workdir.name}.log"
    result = workdir.parent / f"{workdir.name}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DOPPEL_RESULT_FILE": str(result)}
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else ""), wall, usage.ru_maxrss * 1024


def measure(export: str, person: str, args: list[str], scratch: Path) -> Row:
    workdir = scratch / f"{export}-{person}".replace("/", "-")
    code, last, wall, peak = run_local(args, workdir)
    row = Row(export, person)
    if code != 0:
        row.failure = f"exit {code}: {last}"
        return row
    result = json.loads((workdir.parent / f"{workdir.name}.json").read_text(encoding="utf-8"))
    adapter = Path(result["adapter"])
    report = json.loads((adapter / "eval.json").read_text(encoding="utf-8"))
    metrics = json.loads((adapter / "metrics.json").read_text(encoding="utf-8"))
    manifest = json.loads(next((workdir / "data").glob("*/manifest.json")).read_text(encoding="utf-8"))
    row.figures = {
        "name": report.get("person") or person,
        "min_length": (manifest.get("options") or {}).get("min_length"),
        "used": (metrics.get("heldout") or {}).get("train"),
        "trainable": (metrics.get("heldout") or {}).get("train_available"),
        "heldout": report.get("heldout_samples"),
        "replies": report.get("replies"),
        "loss": report.get("heldout_loss") or {},
        "likeness": report.get("likeness") or {},
        "relevance": report.get("relevance") or {},
        "distinct": report.get("distinct") or {},
        "copy_rate": report.get("copy_rate") or {},
        "wall_s": wall,
        "peak_bytes": peak,
    }
    return row


def loss_change(figures: dict[str, Any]) -> float | None:
    base, tuned = figures["loss"].get("base"), figures["loss"].get("adapter")
    return None if not base or tuned is None else (tuned - base) / base * 100


def targets(figures: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: met, missed, or None where the report could not measure it (too few replies)."""
    like, rel = figures["likeness"], figures["relevance"]
    change = loss_change(figures)
    tuned, prompted, real = (like.get(k) for k in ("adapter", "prompted_base", "real"))
    distinct, copied = figures["distinct"].get("adapter"), figures["copy_rate"].get("adapter")
    relevant, relevant_prompted = rel.get("adapter"), rel.get("prompted_base")
    known = tuned is not None and prompted is not None and real is not None
    return {
        "held-out loss -20%": None if change is None else change <= LOSS_TARGET,
        "likeness 0.9 of real": tuned >= LIKENESS_OF_REAL * real if known else None,
        "likeness +0.2 over prompted": tuned >= prompted + LIKENESS_OVER_PROMPTED if known else None,
        "relevance above prompted": (
            None if relevant is None or relevant_prompted is None else relevant > relevant_prompted
        ),
        "distinct 0.75": None if distinct is None else distinct >= DISTINCT_TARGET,
        "copy rate 0.10": None if copied is None else copied <= COPY_TARGET,
        "8 min, 6 GB": figures["wall_s"] <= WALL_TARGET_S and figures["peak_bytes"] <= PEAK_TARGET_BYTES,
    }


def _f(value: float | None, form: str = ".2f") -> str:
    return "-" if value is None else format(value, form)


def table_row(row: Row) -> str:
    if row.failure:
        return f"| {row.export}, {row.person} | failed: {row.failure} |"
    f = row.figures
    loss, like, rel = f["loss"], f["likeness"], f["relevance"]
    change = loss_change(f)
    minutes, seconds = divmod(round(f["wall_s"]), 60)
    return (
        f"| {row.export}, {f['name']} | {f['min_length']} | "
        f"{f['used']} / {f['trainable']} ({f['heldout']}) | "
        f"{_f(loss.get('base'), '.3f')} -> {_f(loss.get('adapter'), '.3f')} ({_f(change, '+.1f')}%) | "
        f"{_f(like.get('adapter'))} / {_f(like.get('prompted_base'))} / {_f(like.get('real'))} "
        f"({_f(like.get('classifier_accuracy'))}, {len(like.get('classes') or [])}; {f['replies']}) | "
        f"{_f(rel.get('adapter'), '+.3f')} / {_f(rel.get('prompted_base'), '+.3f')} | "
        f"{_f(f['distinct'].get('adapter'))} ({_f(f['distinct'].get('real'))}) | "
        f"{_f(f['copy_rate'].get('adapter'))} | {f['peak_bytes'] / 1e9:.2f} GB | {minutes} min {seconds} s |"
    )


HEADER = (
    "| export, person | --min-length | samples used / trainable (held out) | held-out loss base -> adapter | "
    "likeness adapter / prompted / real (accuracy, classes; replies) | relevance adapter / prompted | "
    "distinct adapter (real) | copy rate | peak memory | wall |\n|---|---|---|---|---|---|---|---|---|---|"
)


def summary(rows: list[Row]) -> list[str]:
    measured = [targets(r.figures) for r in rows if not r.failure]
    lines = [f"{len(rows)} people, {len(rows) - len(measured)} failed runs"]
    for name in measured[0] if measured else []:
        met = sum(1 for t in measured if t[name])
        known = sum(1 for t in measured if t[name] is not None)
        lines.append(f"  {name:<28} met for {met} of {known} measured")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", action="append", type=Path, help="an export ZIP (repeatable)")
    parser.add_argument("--people", type=int, default=5, help="most active people of each export")
    parser.add_argument("--no-demo", dest="demo", action="store_false", help="leave the demo out")
    parser.add_argument("--keep", type=Path, help="keep the work directories and logs here")
    options = parser.parse_args()
    exports = options.export or volume_exports()
    if not exports:
        print(f"no export with volume in {REAL_EXPORTS}; pass --export ZIP")
    scratch = options.keep or Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    print(HEADER, flush=True)
    try:
        if options.demo:
            rows.append(measure(DEMO, "Margaret", ["--demo"], scratch))
            print(table_row(rows[-1]), flush=True)
        for export in exports:
            for person in most_active(export, options.people):
                args = ["--export", str(export), "--user", person]
                rows.append(measure(export.stem, person, args, scratch))
                print(table_row(rows[-1]), flush=True)
    finally:
        if options.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
