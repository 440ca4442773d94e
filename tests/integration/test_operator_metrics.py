"""The operator's /metrics, scraped during a run as Prometheus would, follow what happened.

The real operator under kopf against kmock, serving its metrics port. One object asks for a person Slack
does not know (fails at once, BadInput); another scrapes, then its train pod is killed mid-run (as an OOM
kill or a lost node would: retried) and the second attempt finds no base model (BadInput). No vLLM
here: the drift metrics are checked in test_operator_vllm.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.integration.test_operator_conditions import doppeluser
from tests.support.kube_fixtures import OperatorProcess, config_with
from tests.support.metrics import free_port, scrape, value
from tests.support.slack_fixtures import ACME_TOKEN


def phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


async def test_metrics_count_phases_attempts_and_failures(kube, operator_config, slack_emulator):
    port = free_port()
    config = config_with(
        operator_config,
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "1000"),
        metrics_port=port,
    )
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    frozen = kube.jobs.pause_when("train", lambda log: True)
    operator = OperatorProcess(config)
    await operator.start()
    try:
        await kube.kubectl.create(doppeluser("ghost", user="nobody-here"))
        await kube.kubectl.create(doppeluser("bob"))
        await kube.wait_for("ghost", lambda o: phase(o) == "Failed", 60, "ghost Failed")
        await asyncio.wait_for(frozen.reached.wait(), 60)
        await kube.wait_for("bob", lambda o: phase(o) == "Training", 60, "bob Training")

        # Mid-run: one Failed, one Training; both scrapes done and timed; one train Job so far.
        during = await scrape(port)
        assert value(during, "doppel_doppelusers", namespace="team", phase="Failed") == 1
        assert value(during, "doppel_doppelusers", namespace="team", phase="Training") == 1
        assert value(during, "doppel_doppelusers", namespace="team", phase="Ready") == 0
        assert value(during, "doppel_failures_total", reason="BadInput") == 1
        assert value(during, "doppel_job_attempts_total", step="scrape") == 2
        assert value(during, "doppel_job_attempts_total", step="train") == 1
        assert value(during, "doppel_stage_duration_seconds_count", stage="scrape") == 2
        assert value(during, "doppel_stage_duration_seconds_count", stage="train") == 0
        assert value(during, "doppel_training_queue_length") == 0

        [run] = [r for name, r in kube.jobs.runs.items() if "-train-" in name]
        run.process.kill()
        frozen.resume()
        obj = await kube.wait_for("bob", lambda o: phase(o) == "Failed", 180, "bob's second attempt")
        assert obj["status"]["reason"] == "BadInput" and obj["status"]["attempt"] == 2
        after = await scrape(port)
        # Each failure counted once, however many reconcile passes saw it.
        assert value(after, "doppel_failures_total", reason="BadInput") == 2
        assert value(after, "doppel_failures_total", reason="Retrying") == 1
        assert value(after, "doppel_job_attempts_total", step="train") == 2
        assert value(after, "doppel_doppelusers", namespace="team", phase="Failed") == 2
        assert value(after, "doppel_doppelusers", namespace="team", phase="Training") == 0
        # Training (both attempts and the backoff between) is one completed train stage.
        assert value(after, "doppel_stage_duration_seconds_count", stage="train") == 1
        assert value(after, "doppel_stage_duration_seconds_sum", stage="train") > 0
        assert value(after, "doppel_reconcile_errors_total") == 0
    finally:
        frozen.resume()
        await operator.stop()
