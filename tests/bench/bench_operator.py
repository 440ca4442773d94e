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

The emulator forgets requests once served and deleted objects with their history, and finds objects by key
(kmock otherwise matches each request against its whole history and scans every object it holds: quadratic
costs of the emulator, not of the operator).

And the operator's memory with many Jobs (`--users 500 --retrains 4`): every retrain of a DoppelUser leaves
its Jobs (scrape, train, cleanup, prune) and their pods, which kopf's watches keep in memory. Two operators,
each on its own emulator: the first keeps every round's Jobs (no ttlSecondsAfterFinished: 500 x 4 x 4 Jobs
and pods at the end), the second sees each round deleted before the next (what the TTL-after-finished
controller does with the chart's jobs.ttlSecondsAfterFinished). For each, its resident memory (VmRSS, once
it has read every watch event) with the DoppelUsers and no Jobs (the baseline), after the retrains, and its
peak (VmHWM); the ratios against the baseline and kept/TTL, and the cost per kept Job in KiB.

Run: .venv/bin/python tests/bench/bench_operator.py [--objects N] [--users N --retrains N]
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
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
import httpx
from tests.support.kube_fixtures import NAMESPACE, PLURALS, KubeCluster
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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def finished_jobs(user: int, round_: int) -> list[dict[str, Any]]:
    """One retrain's Jobs of a DoppelUser as the operator makes them (jobs.job_manifest), finished, and
    their pods (terminated): what its watches hold until the Jobs are deleted."""
    from doppel.api import DoppelUserSpec
    from doppel.operator import jobs
    from doppel.operator.config import OperatorConfig

    config = OperatorConfig(data_root="/data", worker_image="ghcr.io/doppel-dev/doppel-worker:0.1.0")
    spec = DoppelUserSpec.model_validate(doppeluser(user)["spec"])
    # uids no DoppelUser has: the operator holds these Jobs in its indexes but has nothing to do with them.
    owner = jobs.Owner(NAMESPACE, f"user-{user:04d}", f"gone-{user:04d}-{round_}", round_)
    objects = []
    for step in ("scrape", "train", "cleanup", "prune"):
        command = jobs.train_command(spec, config, owner) if step == "train" else ["doppel", step]
        job = jobs.job_manifest(owner, step, 1, command, spec, config)  # type: ignore[arg-type]
        job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        template = job["spec"]["template"]
        labels = {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}
        message = '{"ok": true, "samples": 500}'
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": job["metadata"]["name"] + "-x7k2p",
                "namespace": NAMESPACE,
                "labels": labels,
            },
            "spec": template["spec"],
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {"name": step, "state": {"terminated": {"exitCode": 0, "message": message}}}
                ],
            },
        }
        objects += [job, pod]
    return objects


async def memory_with_jobs(users: int, retrains: int, ttl: bool) -> dict[str, float]:
    """The operator's VmRSS (MiB) with `users` DoppelUsers and no Jobs ("none"), then after `retrains`
    rounds of their finished Jobs ("jobs"), each round deleted before the next (`ttl`: what the
    TTL-after-finished controller does) or all kept; and its peak (VmHWM)."""
    cluster = KubeCluster(record=False)
    await cluster.start()
    await cluster.kubectl.secret("slack-bot", {"token": "xoxb-bench"})
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "operator.log", "wb")  # noqa: SIM115 (closed below)
        command = [str(BIN / "doppel"), "operator", "--data-claim", "", "--metrics-port", "0"]
        proc = subprocess.Popen(
            [*command, "--api-server", cluster.url, "--namespace", NAMESPACE],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DOPPEL_DATA_ROOT": tmp},
        )
        # The load is sent with aiohttp, 16 requests at a time: httpx retries a missing optional import
        # (sniffio) on every request, which cost the load generator more than the emulator.
        http = aiohttp.ClientSession(cluster.url, connector=aiohttp.TCPConnector(limit=16))

        async def each(objects: list[dict[str, Any]], delete: bool = False) -> None:
            async def one(obj: dict[str, Any]) -> None:
                meta = obj["metadata"]
                plural = PLURALS[obj["kind"]]
                base = f"/apis/{obj['apiVersion']}" if "/" in obj["apiVersion"] else "/api/v1"
                path = f"{base}/namespaces/{meta['namespace']}/{plural}"
                if delete:
                    response = await http.delete(f"{path}/{meta['name']}")
                else:
                    created = {"uid": str(uuid.uuid4()), "generation": 1}  # what kubectl.create adds
                    body = {**obj, "metadata": {**meta, **created}}
                    response = await http.post(path, json=body)
                async with response:
                    if response.status >= 300:
                        raise RuntimeError(f"{response.status} {await response.text()}")

            await asyncio.gather(*(one(obj) for obj in objects))

        async def settle() -> float:
            # Until the operator has read every watch event, then a pause for it to handle the last.
            buses = cluster.emulator._buses.values()  # kmock's per-resource watch buffers
            while any(bus.buffer_size for bus in buses):
                await asyncio.sleep(0.5)
            await asyncio.sleep(5.0)
            return rss_mib(proc.pid)

        try:
            await asyncio.sleep(3.0)
            suspended = [
                {**doppeluser(i), "spec": {**doppeluser(i)["spec"], "suspend": True}} for i in range(users)
            ]
            started = time.perf_counter()
            await each(suspended)
            figures["none"] = await settle()
            for round_ in range(1, retrains + 1):
                batch = [obj for i in range(users) for obj in finished_jobs(i, round_)]
                await each(batch)
                if ttl:
                    await each(batch, delete=True)
                figures[f"round {round_}"] = await settle()
            figures["jobs"] = figures[f"round {retrains}"]
            figures["peak"] = peak_rss_mib(proc.pid)
            figures["seconds"] = time.perf_counter() - started
            if proc.poll() is not None:
                raise RuntimeError(f"the operator exited: {(Path(tmp) / 'operator.log').read_text()[-2000:]}")
        finally:
            await http.close()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            await cluster.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--retrains", type=int, default=4)
    parser.add_argument("--memory-only", action="store_true", help="only the memory-with-Jobs measurement")
    args = parser.parse_args()
    kept = asyncio.run(memory_with_jobs(args.users, args.retrains, ttl=False))
    ttl = asyncio.run(memory_with_jobs(args.users, args.retrains, ttl=True))
    jobs = args.users * args.retrains * 4
    per_job = (kept["jobs"] - kept["none"]) * 1024 / jobs
    print(
        f"{args.users} DoppelUsers, {args.retrains} retrains each ({jobs} finished Jobs and as many pods), "
        "operator VmRSS in MiB (peak VmHWM):"
    )
    for label, figures in (("all kept (no TTL)", kept), ("each round deleted (TTL)", ttl)):
        rounds = ", ".join(f"{figures[f'round {r}']:.0f}" for r in range(1, args.retrains + 1))
        print(
            f"  {label:26} {figures['none']:5.0f} with no Jobs; after each retrain: {rounds} "
            f"(peak {figures['peak']:.0f}); {figures['seconds']:.0f} s"
        )
    print(
        f"  kept: {per_job:.1f} KiB per Job and its pod, {kept['jobs'] / kept['none']:.2f}x the baseline "
        f"(no Jobs) at the end; TTL: {ttl['jobs'] / ttl['none']:.2f}x the baseline, "
        f"{ttl['jobs'] / ttl['round 1']:.2f}x its size after the first retrain; kept/TTL "
        f"{kept['jobs'] / ttl['jobs']:.2f}x"
    )
    if args.memory_only:
        return
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
