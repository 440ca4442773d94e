"""Training progress from the train pod's log: parsing the `--json-progress` lines, and when and how the
reconciler reads them into status.training."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from tests.unit.test_reconcile import CONFIG, NOW, SPEC, finished, observed, owner

from doppel.api import DoppelUserStatus, TrainingProgress
from doppel.bot.logic import describe
from doppel.operator import jobs
from doppel.operator.progress import latest_progress, record_progress
from doppel.operator.reconcile import reconcile


def line(event: str, step: int, total: int = 12, **values: Any) -> str:
    """A line as `doppel train --json-progress` prints it (json.dumps of the trainer's event)."""
    return json.dumps({"event": event, "step": step, "total_steps": total, "epoch": step / 4, **values})


def test_last_progress_line_wins_and_keeps_the_latest_eval_loss():
    log = "\n".join(
        [
            line("progress", 3, loss=2.9),
            line("progress", 4, loss=2.7),
            line("eval", 4, eval_loss=2.5),
            line("progress", 5, loss=2.4),
            "",
        ]
    )
    seen = latest_progress(log)
    assert seen == TrainingProgress(step=5, total_steps=12, epoch=1.25, loss=2.4, eval_loss=2.5, percent=41.7)


def test_garbage_partial_and_foreign_lines_are_skipped():
    log = "\n".join(
        [
            'ps", "step": 2, "total_steps": 12}',  # the tail cut the first line in the middle
            line("progress", 6, loss=2.0),
            "UserWarning: torch_dtype is deprecated",  # stderr is interleaved in the pod log
            "Traceback (most recent call last):",
            "[1, 2, 3]",
            '{"event": "progress", "step": true, "total_steps": 12}',  # a bool is no step
            '{"event": "progress", "step": 9}',  # no total
            '{"event": "metrics", "step": 10, "total_steps": 12}',
            '{"event": "progress", "step": -1, "total_steps": 12}',
            '{"event": "progress", "step": 7, "total_st',  # being written right now
        ]
    )
    seen = latest_progress(log)
    assert seen is not None and (seen.step, seen.total_steps, seen.loss) == (6, 12, 2.0)


def test_no_progress_yet_is_none_and_odd_figures_are_not_copied():
    assert latest_progress("") is None
    assert latest_progress("loading the base model...\n{not json\n") is None
    seen = latest_progress(line("progress", 3, total=0, loss=float("nan")) + "\n")
    assert seen is not None and seen.step == 3 and seen.percent is None and seen.loss is None
    diverged = latest_progress(line("progress", 4, loss=float("inf")))
    assert diverged is not None and diverged.step == 4 and diverged.loss is None


def running_train(pods: list[dict[str, Any]]) -> dict[str, Any]:
    job = jobs.job_manifest(owner(), "train", 1, ["doppel", "train"], SPEC, CONFIG)
    job["status"] = {"active": 1}
    job["_pods"] = pods
    return job


def pod(name: str, started: str, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": phase, "startTime": started}}


def trained_before() -> list[dict[str, Any]]:
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    return [finished(scrape, True, {"ok": True, "samples": 9})]


def test_running_train_job_reads_its_newest_pods_log_on_a_short_timer():
    pods = [pod("t-old", "2026-01-01T00:00:00Z", "Failed"), pod("t-new", "2026-01-01T00:05:00Z")]
    plan = reconcile(observed([*trained_before(), running_train(pods)]), CONFIG)
    assert plan.status.phase == "Training" and plan.create == []
    assert plan.progress_from == ("t-new", "train")
    assert plan.requeue_after == CONFIG.progress_s < CONFIG.resync_s


def test_nothing_to_read_before_the_pod_starts_nor_outside_training():
    waiting = reconcile(observed([*trained_before(), running_train([pod("t", "", "Pending")])]), CONFIG)
    assert waiting.status.phase == "Training" and waiting.progress_from is None
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    assert reconcile(observed([scrape]), CONFIG).progress_from is None
    train = jobs.job_manifest(owner(), "train", 1, [], SPEC, CONFIG)
    done = reconcile(observed([finished(train, True, {"ok": True, "steps": 12, "train_loss": 1.5})]), CONFIG)
    assert done.progress_from is None and done.status.phase == "Registering"
    assert done.status.training == TrainingProgress(
        step=12, total_steps=12, loss=1.5, percent=100, updated_at=NOW
    )


def test_a_new_train_attempt_starts_without_the_old_figures():
    train = jobs.job_manifest(owner(), "train", 1, [], SPEC, CONFIG)
    status = DoppelUserStatus(
        phase="Training", observed_generation=1, training=TrainingProgress(step=5, total_steps=12)
    )
    crashed = finished(train, False, {"ok": False, "kind": "error", "reason": "CUDA out of memory"})
    retry_at = NOW + timedelta(seconds=CONFIG.backoff_s)
    status.retry_at, status.attempt = retry_at, 1
    plan = reconcile(observed([*trained_before(), crashed], status, now=retry_at), CONFIG)
    assert plan.create[0]["metadata"]["name"] == jobs.job_name(owner(), "train", 2)
    assert plan.status.training is None


def test_progress_is_recorded_only_when_it_changed():
    status = DoppelUserStatus(phase="Training")
    first = record_progress(status, latest_progress(line("progress", 4, loss=2.7)), NOW)
    assert first is not status and first.training is not None
    assert (first.training.step, first.training.percent, first.training.updated_at) == (4, 33.3, NOW)
    later = NOW + timedelta(seconds=10)
    # The same figures again (the process is slow or stuck): the very same status, nothing to patch.
    assert record_progress(first, latest_progress(line("progress", 4, loss=2.7)), later) is first
    assert record_progress(first, None, later) is first
    # An eval line after it: the loss of the earlier progress line stays, the eval loss joins.
    second = record_progress(first, latest_progress(line("eval", 4, eval_loss=2.5)), later)
    assert second.training is not None
    assert (second.training.loss, second.training.eval_loss, second.training.updated_at) == (2.7, 2.5, later)
    third = record_progress(second, latest_progress(line("progress", 5, loss=2.4)), later)
    assert third.training is not None and third.training.eval_loss == 2.5 and third.training.step == 5
    assert first.training.step == 4  # the input status is never changed in place


def test_the_bot_shows_the_recorded_progress():
    status = record_progress(DoppelUserStatus(phase="Training"), latest_progress(line("progress", 3)), NOW)
    wire = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert wire["training"] == {
        "step": 3,
        "totalSteps": 12,
        "epoch": 0.75,
        "percent": 25.0,
        "updatedAt": "2026-01-01T00:00:00Z",
    }
    doppel = {"metadata": {"name": "alice"}, "status": wire}
    assert describe(doppel) == "*alice*: Training (25% of 12 steps)"
