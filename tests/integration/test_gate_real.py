"""The fidelity gate on SmolLM2 and a real export: the operator keeps serving an adapter when its retrained
successor is worse on the same held-out replies (and says why), and serves the successor when the spec forces
it. The adapters are trained and measured by `doppel scrape` and `doppel train --compare-with`, as the
operator's Jobs run them; their result files go to the reconciler as the Jobs' termination messages.

Cheap on purpose: 60 samples, 128-token sequences, the serving adapter trained for 4 steps, its successor for
1 step at a learning rate that leaves it the base model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.real_exports import real_export
from tests.unit.test_reconcile import CONFIG, SPEC, finished, observed, owner

from doppel.api import Adapter, DoppelUserStatus
from doppel.operator import jobs
from doppel.operator.conditions import condition
from doppel.operator.reconcile import reconcile

HYPERLEDGER = "hyperledger-slack/hyperledger-slack.zip"
PERSON = "U0XPR4NP4"  # jyellick: 1,914 messages of 100 characters or more
CHEAP = ["--rank", "8", "--alpha", "16", "--dropout", "0", "--epochs", "1", "--batch-size", "2"]
CHEAP += ["--grad-accum", "4", "--max-length", "128", "--no-memory"]


def doppel(*args: str, result: Path) -> dict:
    env = {**os.environ, "DOPPEL_RESULT_FILE": str(result), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "doppel.cli", *args], capture_output=True, text=True, env=env, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.timeout(1800)  # three SmolLM2 runs on CPU: minutes, longer on a loaded machine
def test_a_worse_retrained_adapter_is_not_promoted_and_a_forced_one_is(tmp_path, smollm2_model):
    export = real_export(HYPERLEDGER)
    data = tmp_path / "data"
    doppel("scrape", "--export", str(export), "--user", PERSON, "--out", str(data),
           "--max-samples", "60", result=tmp_path / "scrape.json")  # fmt: skip
    samples = str(data / "samples.jsonl")
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    base = ["--data", samples, "--base-model", str(smollm2_model), "--base-model-name", "smollm2-135m"]
    doppel("train", *base, *CHEAP, "--out", str(v1), "--lr", "2e-3", "--max-steps-per-epoch", "4",
           "--eval-steps", "2", "--no-eval", result=tmp_path / "v1.json")  # fmt: skip
    result = doppel("train", *base, *CHEAP, "--out", str(v2), "--lr", "1e-7", "--max-steps-per-epoch", "1",
                    "--compare-with", str(v1), result=tmp_path / "v2.json")  # fmt: skip
    new, serving = result["eval"], result["eval_serving"]
    # Both on v2's held-out replies: v2 is the base model there, v1 learnt something of the person.
    assert (v2 / "eval-serving.json").is_file()
    assert serving["heldout_loss_adapter"] < new["heldout_loss_adapter"] * 0.98, (serving, new)
    # The Job judged it, reply by reply where it could: the operator takes its verdict.
    assert any(worse.startswith("held-out loss") for worse in result["gate_regressions"])

    adapter = Adapter(served_name="team.alice.v1", path=str(v1), version=1)
    ready = DoppelUserStatus(phase="Ready", observed_generation=2, adapter=adapter, served_by=["vllm-0"])
    train = jobs.job_manifest(owner(2), "train", 1, jobs.train_command(SPEC, CONFIG, owner(2), str(v1)),
                              SPEC, CONFIG)  # fmt: skip
    plan = reconcile(observed([finished(train, True, result)], ready, generation=2), CONFIG)
    assert plan.status.adapter == adapter and plan.register is None  # v1 keeps serving
    promoted = condition(plan.status, "Promoted")
    assert (promoted.status, promoted.reason) == ("False", "FidelityRegressed")
    assert "held-out loss" in promoted.message and "serving" in promoted.message

    forced = SPEC.model_copy(update={"training": SPEC.training.model_copy(update={"force_promotion": True})})
    plan = reconcile(observed([finished(train, True, result)], ready, generation=2, spec=forced), CONFIG)
    assert plan.register is not None and plan.register.version == 2
    assert condition(plan.status, "Promoted").reason == "Forced"
