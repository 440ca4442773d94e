"""Benchmark: 300 DoppelUsers created at once against the kmock Kubernetes emulator.

The operator runs as in production (`doppel operator`, its own process, kopf) against kmock served on
loopback. Nothing runs the Jobs: this measures the operator's reaction, not scraping. Prints:
- per object, the time from its creation to its scrape Job existing: p50 / p95 / max, and the time until
  all 300 have theirs;
- the operator's peak memory (VmHWM of its process);
- both as ratios against a baseline measured in the same run: a bare kopf operator (its own process,
  same emulator) whose only handler creates one Job per object on creation, the floor kopf sets;
- the cost of metrics: the doppel operator twice, metrics off (`--metrics-port 0`) and on with /metrics
  scraped every 0.5 s (far more often than Prometheus would), and the on/off ratios (the aim: under 5%).

The emulator forgets requests once served (kmock otherwise matches each request against its whole history,
a quadratic cost of the emulator, not of the operator).

Run: .venv/bin/python tests/bench/bench_operator.py [--objects N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
from tests.support.kube_fixtures import NAMESPACE, KubeCluster
from tests.support.metrics import free_port

BIN = Path(sys.executable).parent

# The baseline: the least a kopf operator can do per object (one Job on creation).
BASELINE_OPERATOR = """
import sys, kopf, httpx

URL = sys.argv[1]

@kopf.on.login()
def login(**_):
    return kopf.ConnectionInfo(server=URL, insecure=True)

@kopf.on.create("doppel.dev", "v1alpha1", "doppelusers")
async def create(name, namespace, uid, **_):
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": f"{name}-scrape", "namespace": namespace,
                        "labels": {"doppel.dev/uid": uid, "doppel.dev/step": "scrape"}},
           "spec": {"template": {"spec": {"restartPolicy": "Never",
                    "containers": [{"name": "x", "image": "x", "command": ["true"]}]}}}}
    async with httpx.AsyncClient(base_url=URL) as http:
        (await http.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", json=job)).raise_for_status()

kopf.run(clusterwide=True, standalone=True)
"""


def doppeluser(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "doppel.dev/v1alpha1",
        "kind": "DoppelUser",
        "metadata": {"name": f"user-{i:04d}", "namespace": NAMESPACE},
        "spec": {
            "slack": {"teamId": "T0ACME001", "tokenSecretRef": {"name": "slack-bot"}},
            "target": {"handle": f"user{i}"},
            "baseModel": {"servedName": "base", "path": "/models/base"},
        },
    }


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def scrape_job_owners(cluster: KubeCluster) -> dict[str, float]:
    """uid -> when its scrape Job was first seen (polled in memory: not an API request)."""
    return {
        job["metadata"]["labels"]["doppel.dev/uid"]: time.perf_counter()
        for job in cluster.jobs()
        if job["metadata"].get("labels", {}).get("doppel.dev/step") == "scrape"
    }


async def scrape_metrics(port: int, stop: asyncio.Event, interval: float = 0.5) -> int:
    """GET /metrics every `interval` seconds until `stop`; returns how many scrapes succeeded."""
    scrapes = 0
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.TransportError):
                (await client.get(f"http://127.0.0.1:{port}/metrics")).raise_for_status()
                scrapes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    return scrapes


async def run_once(
    command: list[str], objects: int, label: str, metrics_port: int | None = None
) -> dict[str, float]:
    cluster = KubeCluster(record=False)
    await cluster.start()
    await cluster.kubectl.secret("slack-bot", {"token": "xoxb-bench"})
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "operator.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [*command, cluster.url] if label == "baseline" else [*command, "--api-server", cluster.url],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DOPPEL_DATA_ROOT": tmp},
        )
        try:
            await asyncio.sleep(3.0)  # let it log in and start its watches
            if proc.poll() is not None:
                tail = (Path(tmp) / "operator.log").read_text()[-2000:]
                raise RuntimeError(f"{label} operator exited: {tail}")
            stop = asyncio.Event()
            scraper = asyncio.create_task(scrape_metrics(metrics_port, stop)) if metrics_port else None
            created: dict[str, float] = {}

            async def create(i: int) -> None:
                obj = await cluster.kubectl.create(doppeluser(i))
                created[obj["metadata"]["uid"]] = time.perf_counter()

            start = time.perf_counter()
            await asyncio.gather(*(create(i) for i in range(objects)))
            seen: dict[str, float] = {}
            deadline = start + 600
            while len(seen) < objects and time.perf_counter() < deadline:
                for uid, when in (await scrape_job_owners(cluster)).items():
                    seen.setdefault(uid, when)
                await asyncio.sleep(0.05)
            all_done = time.perf_counter() - start
            await asyncio.sleep(1.0)
            memory = peak_rss_mib(proc.pid)
            stop.set()
            scrapes = await scraper if scraper is not None else 0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            await cluster.stop()
    if len(seen) < objects:
        raise RuntimeError(f"{label}: only {len(seen)}/{objects} scrape Jobs after 600 s")
    latencies = sorted(seen[uid] - created[uid] for uid in created)
    return {
        "p50": statistics.median(latencies),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
        "max": latencies[-1],
        "all": all_done,
        "memory": memory,
        "scrapes": scrapes,
    }


def instrumentation_cost(objects: int) -> tuple[float, float]:
    """Seconds per reconcile pass spent in the metrics calls (a status report and a Job created), and per
    /metrics scrape with `objects` DoppelUsers held: measured directly, as the end-to-end on/off figures
    move more with this shared machine's load than with metrics."""
    from prometheus_client import generate_latest

    from doppel.api import DoppelUserStatus
    from doppel.operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    statuses = [
        DoppelUserStatus(phase=p) for p in ("Pending", "Scraping", "Training", "Registering", "Ready")
    ]
    job = {"metadata": {"labels": {"doppel.dev/step": "scrape"}}}
    metas = [{"uid": f"u{i}", "namespace": NAMESPACE, "name": f"user-{i}"} for i in range(objects)]
    passes = 20_000
    started = time.perf_counter()
    for i in range(passes):
        old, new = statuses[i % 5], statuses[(i + 1) % 5]
        metrics.status(metas[i % objects], old, new)
        metrics.job_created(job)
    per_pass = (time.perf_counter() - started) / passes
    started = time.perf_counter()
    for _ in range(100):
        generate_latest(metrics.registry)
    return per_pass, (time.perf_counter() - started) / 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=300)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(BASELINE_OPERATOR)
    try:
        baseline = asyncio.run(run_once([sys.executable, script.name], args.objects, "baseline"))
    finally:
        os.unlink(script.name)
    command = [str(BIN / "doppel"), "operator", "--data-claim", ""]
    off = asyncio.run(run_once([*command, "--metrics-port", "0"], args.objects, "doppel"))
    port = free_port()
    doppel = asyncio.run(run_once([*command, "--metrics-port", str(port)], args.objects, "doppel", port))
    print(f"{args.objects} DoppelUsers created at once; time from creation to scrape Job, per object:")
    print(f"{'':30}{'p50 s':>9}{'p95 s':>9}{'max s':>9}{'all s':>9}{'peak MiB':>10}")
    rows = (
        ("bare kopf (baseline)", baseline),
        ("doppel operator, metrics off", off),
        ("doppel operator, metrics on", doppel),
    )
    for label, figures in rows:
        print(
            f"{label:30}{figures['p50']:9.2f}{figures['p95']:9.2f}{figures['max']:9.2f}"
            f"{figures['all']:9.2f}{figures['memory']:10.1f}"
        )
    print(
        "ratio doppel/baseline: "
        f"p50 {doppel['p50'] / baseline['p50']:.2f}x, p95 {doppel['p95'] / baseline['p95']:.2f}x, "
        f"all {doppel['all'] / baseline['all']:.2f}x, "
        f"peak memory {doppel['memory'] / baseline['memory']:.2f}x"
    )
    per_pass, per_scrape = instrumentation_cost(args.objects)
    print(
        f"metrics calls per reconcile pass: {per_pass * 1e6:.1f} us = {per_pass / off['p50']:.5%} of the p50 "
        f"reaction; one /metrics scrape with {args.objects} objects: {per_scrape * 1e3:.2f} ms"
    )
    print(
        f"metrics on / off ({doppel['scrapes']} scrapes of /metrics during the run): "
        f"p50 {doppel['p50'] / off['p50']:.2f}x, p95 {doppel['p95'] / off['p95']:.2f}x, "
        f"all {doppel['all'] / off['all']:.2f}x, peak memory {doppel['memory'] / off['memory']:.2f}x"
    )


if __name__ == "__main__":
    main()
