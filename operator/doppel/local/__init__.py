"""`doppel local`: the whole pipeline on one machine, no cluster, no GPU needed.

Stages, each shown with its number, name and elapsed time: workspace (the demo export, or the given one)
-> base model (the demo: SmolLM2-135M-Instruct, built once into the models cache) -> scrape (incremental)
-> train (skipped when nothing changed) -> eval (the fidelity report, eval.json; see doppel.train.fidelity)
-> replies (the in-process transformers+peft backend answers a few questions, adapter and persona-prompted
base model side by side, in one batch).

Everything goes under one work directory:

    WORKDIR/demo/workspace.zip          the synthetic export (--demo)
    WORKDIR/models/doppel-tiny/         the tiny base model (--base-model doppel-tiny)
    WORKDIR/data/USER/                  samples.jsonl, manifest.json, the scrape's incremental state
    WORKDIR/adapters/USER/FINGERPRINT/  the adapter (+ metrics.json, eval.json, fingerprint.json);
                                        FINGERPRINT hashes samples, base model and training settings, so
                                        a second run with the same inputs reuses it instead of retraining
    WORKDIR/adapters/USER/SERVING       which of them is served: a new one must pass the fidelity gate
                                        (`serving`), or --force-promotion

Modules: `settings` (the options, the work directory's layout, training budgets, the fingerprint),
`pipeline` (the stages), `serving` (the fidelity gate), `outcome` (what a run produced and the printed
report), `bot` (--socket-mode).
"""

from doppel.local.bot import LOCAL_NAMESPACE, local_bot, socket_mode_config
from doppel.local.outcome import Outcome, report
from doppel.local.pipeline import run_local
from doppel.local.settings import Settings

__all__ = [
    "LOCAL_NAMESPACE",
    "Outcome",
    "Settings",
    "local_bot",
    "report",
    "run_local",
    "socket_mode_config",
]
