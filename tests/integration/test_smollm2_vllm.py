"""The real vLLM CPU server serves SmolLM2 with the demo's adapter loaded at runtime, and the reply that
`doppel chat --vllm-url` obtains is attributed to the person by the fidelity report's own classifier."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tests.support.vllm_fixtures import VllmServer

from doppel.demo.workspace import MARGARET, demo_questions
from doppel.train.fidelity import PERSON_CLASS, report_classifier


@pytest.mark.vllm
def test_vllm_reply_with_the_demo_adapter_is_attributed_to_the_person(smollm2_model, smollm2_demo, tmp_path):
    _, question = demo_questions(MARGARET.id)[0]
    with VllmServer(smollm2_model, tmp_path / "vllm.log", served_model_name="smollm2-135m") as server:
        command = [
            sys.executable, "-m", "doppel.cli", "chat", "--adapter", str(smollm2_demo.adapter),
            "--vllm-url", server.base_url, "--once", question, "--temperature", "0", "--max-tokens", "96",
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:] + server.log_tail()
    reply = proc.stdout.strip()
    assert reply
    classifier = report_classifier(smollm2_demo.adapter, smollm2_demo.samples)
    assert classifier is not None
    assert classifier.predict([reply]) == [PERSON_CLASS], reply
