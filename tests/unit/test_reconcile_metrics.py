"""The operator's metrics from status transitions: what is timed, what is counted once."""

from __future__ import annotations

import itertools

from doppel.api import DoppelUserStatus
from doppel.operator.metrics import OperatorMetrics

META = {"uid": "u1", "namespace": "team", "name": "alice"}


def st(phase: str, reason: str | None = None, attempt: int = 1) -> DoppelUserStatus:
    return DoppelUserStatus(phase=phase, reason=reason, attempt=attempt)  # type: ignore[arg-type]


def walk(metrics: OperatorMetrics, *statuses: DoppelUserStatus) -> None:
    for old, new in itertools.pairwise(statuses):
        metrics.status(META, old, new)
        metrics.status(META, new, new)  # a reconcile pass that changes nothing


def sample(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_each_stage_seen_from_its_start_is_timed_once():
    metrics = OperatorMetrics()
    walk(
        metrics,
        st("Pending"),
        st("Scraping"),
        st("Pending", "Queued"),
        st("Training"),
        st("Training", "Retrying"),
        st("Training", attempt=2),
        st("Registering"),
        st("Ready"),
    )
    for stage in ("scrape", "queue", "train", "register"):
        assert sample(metrics, "doppel_stage_duration_seconds_count", stage=stage) == 1, stage
    assert sample(metrics, "doppel_failures_total", reason="Retrying") == 1
    assert sample(metrics, "doppel_doppelusers", namespace="team", phase="Ready") == 1
    assert sample(metrics, "doppel_doppelusers", namespace="team", phase="Training") == 0


def test_a_stage_under_way_when_first_seen_is_not_timed():
    metrics = OperatorMetrics()  # e.g. the standby replica taking over mid-training
    walk(metrics, st("Training"), st("Training"), st("Registering"))
    assert sample(metrics, "doppel_stage_duration_seconds_count", stage="train") == 0


def test_a_failure_is_counted_once_and_forgotten_objects_leave_the_gauges():
    metrics = OperatorMetrics()
    walk(metrics, st("Scraping"), st("Failed", "BadInput"), st("Failed", "BadInput"))
    metrics.status(META, st("Failed", "BadInput"), st("Failed", "BadInput"))  # after a restart
    assert sample(metrics, "doppel_failures_total", reason="BadInput") == 1
    assert sample(metrics, "doppel_doppelusers", namespace="team", phase="Failed") == 1
    metrics.drift(META, [], {"vllm-0": "connection refused"})
    assert sample(metrics, "doppel_vllm_drift_pods", namespace="team") == 1
    metrics.forget("team", "u1")
    assert sample(metrics, "doppel_doppelusers", namespace="team", phase="Failed") == 0
    assert sample(metrics, "doppel_vllm_drift_pods", namespace="team") == 0


def test_disabled_metrics_record_nothing():
    metrics = OperatorMetrics(enabled=False)
    walk(metrics, st("Scraping"), st("Failed", "BadInput"))
    metrics.job_created({"metadata": {"labels": {"doppel.dev/step": "scrape"}}})
    assert sample(metrics, "doppel_failures_total", reason="BadInput") == 0
    assert sample(metrics, "doppel_job_attempts_total", step="scrape") == 0
    assert metrics.objects == {}
