"""Twenty consistent corrections on the demo workspace change what the retrained doppel writes, measured.

Margaret (the demo's person) ends every message with "Kind regards, Margaret". Her doppel (the SmolLM2
demo, `doppel local --demo`) answers twenty of her threads; she corrects each reply the way the bot's
"Correct this" modal stores it (the feedback store of her doppel's data directory): the same words without
the sign-off, as she writes now. `doppel local --demo` again, as a user would rerun it, retrains with the
corrections (weighted samples, then DPO). Twenty other threads, never corrected, are answered greedily by
the old and the new adapter: the share of replies that sign off must fall.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tests.support.corrections import answer, correct, pick_threads, signs_off
from tests.support.model_fixtures import doppel_local

from doppel.memory.feedback import FeedbackStore

REPLY_TOKENS = 120  # her replies are long: the sign-off comes last


# Two `doppel local --demo` runs (the shared fixture's, when this test runs first, and the retraining):
# about 10 minutes on 2 idle cores, too long for `make test`'s budget beside the other demo tests.
@pytest.mark.skipif(
    os.environ.get("DOPPEL_LONG_TESTS") != "1", reason="a second demo training: opt-in, DOPPEL_LONG_TESTS=1"
)
@pytest.mark.timeout(1800)
def test_twenty_corrections_stop_the_sign_off_elsewhere_too(smollm2_demo, smollm2_model, tmp_path):
    workdir = tmp_path / "doppel-data"
    shutil.copytree(smollm2_demo.workdir, workdir, symlinks=True)  # the other tests keep the shared run
    data = workdir / "data" / "margaret"
    old = workdir / "adapters" / "margaret" / smollm2_demo.adapter.name
    to_correct, to_measure = pick_threads(data / "samples.remembered.jsonl", 20, 20)
    store = FeedbackStore(data)
    correct(store, smollm2_model, old, to_correct, REPLY_TOKENS)
    assert store.counts().corrections == 20
    measured = [r["messages"][:-1] for r in to_measure]
    before = answer(smollm2_model, old, measured, REPLY_TOKENS)

    result_file = tmp_path / "result.json"
    # Forced past the fidelity gate: without the sign-off her doppel is less like her held-out replies,
    # which still have it; what is measured here is what the corrections taught.
    proc = doppel_local("--demo", "--force-promotion", workdir=workdir, result=result_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = Path(json.loads(result_file.read_text())["adapter"])
    assert new != old and not old.exists()  # a new adapter for the new inputs; the old one is gone
    metrics = json.loads((new / "metrics.json").read_text())
    assert metrics["preference"]["pairs"] >= 8 and metrics["preference"]["steps"] > 0
    after = answer(smollm2_model, new, measured, REPLY_TOKENS)

    share_before = sum(map(signs_off, before)) / len(before)
    share_after = sum(map(signs_off, after)) / len(after)
    print(f"signing off: {share_before:.0%} before, {share_after:.0%} after; {metrics['preference']}")
    assert share_before >= 0.6, before
    assert share_after <= share_before / 2, after
