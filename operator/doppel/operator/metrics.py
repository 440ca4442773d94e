"""The operator's Prometheus metrics, fed by one-line calls from the reconcile pass and vLLM registration.

Everything is derived from what the handlers already see: status transitions (phases, stage durations,
failures), the Jobs they create (attempts), the training queue and the vLLM drift check. Stage durations
are timed from when this process saw the stage begin: a stage that began before it took over (a restart,
the other replica) is not timed rather than timed wrong.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from doppel.api import DoppelUserStatus
from doppel.metrics import Exporter
from doppel.operator import jobs

PHASES = ("Pending", "Scraping", "Training", "Registering", "Ready", "Failed")
# Seconds to hours: a scrape takes seconds to minutes, a training minutes to hours.
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, float("inf"))
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
# Up to a minute: on an overloaded operator a pass waits for the event loop and the API server that long.
RECONCILE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    float("inf"),
)


def stage(status: DoppelUserStatus) -> str | None:
    """The pipeline stage a status is in, as the duration histogram names it."""
    if status.phase == "Pending" and status.reason == "Queued":
        return "queue"
    return {"Scraping": "scrape", "Training": "train", "Registering": "register"}.get(status.phase)


class _Live(Collector):
    """Gauges computed at scrape time from what the operator holds now (objects come and go)."""

    def __init__(self, metrics: OperatorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        objects = list(self.metrics.objects.values())
        phases = GaugeMetricFamily(
            "doppel_doppelusers", "DoppelUsers by phase, per namespace.", labels=["namespace", "phase"]
        )
        counts = Tally((namespace, status.phase) for namespace, status in objects)
        for namespace in sorted({namespace for namespace, _ in objects}):
            for phase in PHASES:
                phases.add_metric([namespace, phase], counts[namespace, phase])
        yield phases
        queued = sum(1 for _, status in objects if stage(status) == "queue")
        yield GaugeMetricFamily(
            "doppel_training_queue_length", "DoppelUsers waiting for a training slot.", value=queued
        )
        drift = GaugeMetricFamily(
            "doppel_vllm_drift_pods",
            "Ready vLLM pods not serving a Ready DoppelUser's adapter after the last drift check "
            "(out of step and not repaired).",
            labels=["namespace"],
        )
        per_namespace = Tally()
        for (namespace, _), pods in self.metrics.unrepaired.items():
            per_namespace[namespace] += pods
        for namespace in sorted({namespace for namespace, _ in objects} | set(per_namespace)):
            drift.add_metric([namespace], per_namespace[namespace])
        yield drift


class OperatorMetrics:
    """One operator's metrics; with `enabled=False` every call returns at once (and nothing is served)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        self.objects: dict[str, tuple[str, DoppelUserStatus]] = {}  # uid -> (namespace, last status)
        self.unrepaired: dict[tuple[str, str], int] = {}  # (namespace, uid) -> pods
        self._began: dict[str, tuple[str | None, float | None]] = {}  # uid -> (stage, monotonic start)
        self._exporter: Exporter | None = None
        self.stage_seconds = Histogram(
            "doppel_stage_duration_seconds",
            "Time spent in each pipeline stage (scrape, queue wait, train, register), per completed stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.attempts = Counter(
            "doppel_job_attempts",
            "Jobs created, by step (scrape, train, cleanup, purge).",
            ["step"],
            registry=self.registry,
        )
        self.failures = Counter(
            "doppel_failures",
            "Failures by reason: a DoppelUser turning Failed (BadInput, RetriesExhausted, InvalidSpec...) "
            "or a failed attempt that is retried (Retrying).",
            ["reason"],
            registry=self.registry,
        )
        self.registration_seconds = Histogram(
            "doppel_adapter_registration_seconds",
            "Time to load a new adapter on every ready vLLM pod.",
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.drift_detected = Counter(
            "doppel_vllm_drift_detected",
            "vLLM pods found not serving a Ready DoppelUser's adapter (a restart loses runtime-loaded ones).",
            registry=self.registry,
        )
        self.drift_repairs = Counter(
            "doppel_vllm_drift_repairs",
            "Adapters reloaded on a vLLM pod that had lost them.",
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "doppel_reconcile_duration_seconds",
            "Time of one reconcile pass of a DoppelUser (a Ready one's is its drift check).",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "doppel_reconcile_errors",
            "Reconcile passes that raised (retried with backoff).",
            registry=self.registry,
        )
        self.registry.register(_Live(self))

    # --- serving ---------------------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: any free port); returns the port."""
        self._exporter = Exporter(self.registry, port, addr)
        return self._exporter.port

    def close(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None

    # --- what the handlers report -----------------------------------------------------------------------

    def status(self, meta: dict[str, Any], old: DoppelUserStatus, new: DoppelUserStatus) -> None:
        """The status of an object after a reconcile pass (`old`: before it)."""
        if not self.enabled:
            return
        uid = meta["uid"]
        self.objects[uid] = (meta["namespace"], new)
        now, current = time.monotonic(), stage(new)
        began = self._began.get(uid)
        if began is None:
            # First seen here: timed only if the stage begins now, not if it was already under way.
            self._began[uid] = (current, now if stage(old) != current else None)
        elif began[0] != current:
            if began[0] is not None and began[1] is not None:
                self.stage_seconds.labels(began[0]).observe(now - began[1])
            self._began[uid] = (current, now)
        if new.phase == "Failed" and (old.phase != "Failed" or old.reason != new.reason):
            self.failures.labels(new.reason or "Unknown").inc()
        elif new.reason == "Retrying" and (old.reason != "Retrying" or old.attempt != new.attempt):
            self.failures.labels("Retrying").inc()

    def job_created(self, manifest: dict[str, Any]) -> None:
        if self.enabled:
            self.attempts.labels(manifest["metadata"]["labels"].get(jobs.L_STEP, "unknown")).inc()

    def registered(self, started: float, loaded: Iterable[str], errors: dict[str, str]) -> None:
        """A registration attempt that began at `started` (time.monotonic()); timed when it succeeded."""
        if self.enabled and list(loaded) and not errors:
            self.registration_seconds.observe(time.monotonic() - started)

    def drift(self, meta: dict[str, Any], repaired: Iterable[str], errors: dict[str, str]) -> None:
        """One drift check: pods that had lost the adapter and got it back, pods still without it."""
        if not self.enabled:
            return
        repaired = list(repaired)
        self.drift_detected.inc(len(repaired) + len(errors))
        self.drift_repairs.inc(len(repaired))
        self.unrepaired[meta["namespace"], meta["uid"]] = len(errors)

    def reconciled(self, started: float) -> None:
        """A pass that began at `started` (time.monotonic()) is over."""
        if self.enabled:
            self.reconcile_seconds.observe(time.monotonic() - started)

    def reconcile_failed(self) -> None:
        if self.enabled:
            self.reconcile_errors.inc()

    def forget(self, namespace: str, uid: str) -> None:
        """The object is gone (or no longer this process's): drop it from the live gauges."""
        self.objects.pop(uid, None)
        self._began.pop(uid, None)
        self.unrepaired.pop((namespace, uid), None)
