"""Benchmark: a thousand doppels. Prints, in one run:

1. The operator at 1,000 Ready DoppelUsers and 4 vLLM pods (its own process, `doppel operator`, kopf, against
   the kmock emulator; the pods are loopback servers speaking vLLM's adapter API and counting requests,
   tests/support/vllm_pods.py): operator->vLLM requests per minute in steady state, against the old
   per-user scheme (this repository's operator before issue 28, run from `git archive` of BASELINE_REF
   in the same way), the bytes of /v1/models it pulls, its peak memory (VmHWM), and the p95 of a reconcile
   pass (`doppel_reconcile_duration_seconds`; the old operator has no such metric).
2. The real vLLM CPU server with the tiny model (`doppel make-tiny-model`): registering 1,000 adapters
   (`/v1/load_lora_adapter`, one after another: wall time, per load, and the server's memory per adapter,
   at the test settings --max-loras 4 --max-cpu-loras 8), and what one /v1/models listing then weighs.
3. On that server: the first reply of a doppel whose adapter is in no cache (loaded from the volume by the
   LoRA resolver on first use, or registered but evicted) against a warm one's (greedy, 8 tokens).
4. The bot's cold-start path: the real bot (uvicorn, Bolt, SQL-backed ledger and held mentions) with the
   Slack emulator, the pool at zero (nothing listening), a pod start emulated by opening a TCP gate to the
   running vLLM after POD_START_S: mention -> "waking up" note, mention -> answer, and the bot's own share
   (answer - pod start - a warm reply).

Needs $DOPPEL_VLLM_PYTHON (vLLM's virtualenv) for 2-4; skips them without it.
Run: .venv/bin/python tests/bench/bench_scale.py [--users 1000] [--pods 4] [--adapters 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
from tests.support.bot_fixtures import (
    CHANNEL,
    BotHarness,
    TcpGate,
    bot_config,
    doppel_body,
    mention_payload,
    say,
)
from tests.support.kube_fixtures import NAMESPACE as OPERATOR_NAMESPACE
from tests.support.kube_fixtures import KubeCluster, vllm_pod
from tests.support.metrics import free_port
from tests.support.slack_emulator import SlackEmulator
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID, load_workspace
from tests.support.vllm_fixtures import VllmServer
from tests.support.vllm_pods import AdapterApiPod

from doppel.bot.directory import MemoryDirectory
from doppel.bot.server import create_bot
from doppel.serve.backend import GenerationParams
from doppel.serve.vllm import VllmClient

REPO = Path(__file__).resolve().parents[2]
# The operator before issue 28 (a listing per DoppelUser per pod per interval, a new client each time).
BASELINE_REF = "61c4557"
RESYNC_S = 30.0  # the chart's operator.resyncSeconds
WINDOW_S = 60.0
POD_START_S = 5.0
GREEDY = GenerationParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=8)
QUESTION = [{"role": "user", "content": "when is the deploy?"}]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process of a process group (vLLM's server and its engine core)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total / 1024


def ready_doppeluser(i: int, pods: int) -> dict[str, Any]:
    """A DoppelUser as a running operator leaves it: Ready, its adapter served by every pod."""
    name = f"user-{i:04d}"
    return {
        "apiVersion": "doppel.dev/v1alpha1",
        "kind": "DoppelUser",
        "metadata": {"name": name, "namespace": OPERATOR_NAMESPACE},
        "spec": {
            "slack": {"teamId": "T0ACME001", "tokenSecretRef": {"name": "slack-bot", "key": "token"}},
            "target": {"handle": name},
            "baseModel": {"servedName": "doppel-tiny", "path": "/models/tiny"},
        },
        "status": {
            "phase": "Ready",
            "observedGeneration": 1,
            "adapter": {"servedName": f"{name}-v1", "path": f"/data/{name}/v1", "version": 1},
            "servedBy": [f"vllm-{n}" for n in range(pods)],
        },
    }


def histogram_p95(text: str, name: str, before: dict[float, float] | None = None) -> tuple[float, dict]:
    """p95 (a bucket's upper bound) of a Prometheus histogram, over the observations since `before`."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    counts = {b: c - (before or {}).get(b, 0.0) for b, c in buckets.items()}
    total = counts.get(float("inf"), 0.0)
    p95 = next((b for b in sorted(counts) if total and counts[b] >= 0.95 * total), float("nan"))
    return p95, buckets


def histogram_totals(text: str, name: str) -> tuple[float, float]:
    """(count, sum) of a Prometheus histogram."""
    values = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f"{name}_{part} "):
                values[part] = float(line.rsplit(" ", 1)[1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def baseline_tree(tmp: Path) -> Path:
    """The operator package as it was at BASELINE_REF."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BASELINE_REF, "operator"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "operator"


async def operator_scale(users: int, pods: int, source: Path | None) -> dict[str, float]:
    """Steady-state cost of the operator's checks, from the pods' side."""
    cluster = KubeCluster(record=False)
    await cluster.start()
    await cluster.kubectl.secret("slack-bot", {"token": "xoxb-bench"})
    fleet = [AdapterApiPod().start() for _ in range(pods)]
    for n, pod in enumerate(fleet):
        await cluster.kubectl.create(vllm_pod(f"vllm-{n}", pod.port))
    for pod in fleet:  # registered by an earlier operator: what is measured is the steady state
        pod.loaded = {f"user-{i:04d}-v1": f"/data/user-{i:04d}/v1" for i in range(users)}
    for start in range(0, users, 100):
        batch = range(start, min(start + 100, users))
        await asyncio.gather(*(cluster.kubectl.create(ready_doppeluser(i, pods)) for i in batch))
    port = free_port()
    env = {**os.environ, "DOPPEL_DATA_ROOT": tempfile.mkdtemp(prefix="bench-scale-")}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    command = [sys.executable, "-c", "from doppel.cli import main; main()", "operator", "--data-claim", ""]
    command += ["--api-server", cluster.url, "--metrics-port", str(port), "--resync", str(RESYNC_S)]
    log = tempfile.NamedTemporaryFile(prefix="bench-scale-operator-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        started = time.monotonic()
        # Every object checked once (the first pass of each loop), then one more interval.
        while sum(pod.count("GET /v1/models") for pod in fleet) < pods or time.monotonic() - started < 5:
            if proc.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError(f"the operator never checked the pods; log: {log.name}")
            await asyncio.sleep(0.5)
        settle = time.monotonic() - started
        await asyncio.sleep(RESYNC_S + 10)
        async with httpx.AsyncClient() as http:
            before = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            cpu_before = cpu_seconds(proc.pid)
            for pod in fleet:
                pod.reset_counts()
            await asyncio.sleep(WINDOW_S)
            after = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            cpu = cpu_seconds(proc.pid) - cpu_before
        requests = sum(sum(pod.requests.values()) for pod in fleet)
        listings = sum(pod.count("GET /v1/models") for pod in fleet)
        pulled = sum(pod.listing_bytes for pod in fleet)
        _, base = histogram_p95(before, "doppel_reconcile_duration_seconds")
        p95, _ = histogram_p95(after, "doppel_reconcile_duration_seconds", base)
        count_before, sum_before = histogram_totals(before, "doppel_reconcile_duration_seconds")
        count_after, sum_after = histogram_totals(after, "doppel_reconcile_duration_seconds")
        passes = count_after - count_before
        return {
            # The old operator has no reconcile histogram: its passes and CPU per pass read nan.
            "passes_per_min": passes * 60 / WINDOW_S if passes else float("nan"),
            "reconcile_mean_s": (sum_after - sum_before) / passes if passes else float("nan"),
            "cpu_ms_per_pass": cpu * 1000 / passes if passes else float("nan"),
            "cpu_share": cpu / WINDOW_S,
            "settle_s": settle,
            "requests_per_min": requests * 60 / WINDOW_S,
            "listings_per_min": listings * 60 / WINDOW_S,
            "mib_per_min": pulled * 60 / WINDOW_S / 2**20,
            "peak_mib": peak_rss_mib(proc.pid),
            "reconcile_p95_s": p95,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pod in fleet:
            pod.stop()
        await cluster.stop()


def make_adapters(tmp: Path, count: int) -> tuple[Path, list[Path]]:
    """The tiny model and `count` adapter directories (links to one random rank-8 adapter on q, v)."""
    model = tmp / "tiny"
    subprocess.run(
        [sys.executable, "-c", "from doppel.cli import main; main()", "make-tiny-model", str(model)],
        check=True,
        capture_output=True,
    )
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    one = tmp / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(str(one))
    links = []
    (tmp / "adapters").mkdir()
    for i in range(count):
        link = tmp / "adapters" / f"a{i:04d}"
        link.symlink_to(one)
        links.append(link)
    return model, links


def vllm_figures(tmp: Path, count: int) -> tuple[dict[str, float], VllmServer]:
    model, links = make_adapters(tmp, count)
    lora_dir = tmp / "lora"
    lora_dir.mkdir()
    for i in range(7):
        (lora_dir / f"cold-{i}").symlink_to(links[0].resolve())
    env = {"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(lora_dir)}
    server = VllmServer(model, tmp / "vllm.log", extra_env=env, startup_timeout=900)
    started = time.monotonic()
    server.start()
    startup = time.monotonic() - started
    assert server.process is not None
    figures: dict[str, float] = {"startup_s": startup}
    with VllmClient(server.base_url) as client:
        client.chat("doppel-tiny", QUESTION, GREEDY)  # warm the server itself
        rss_before = group_rss_mib(server.process.pid)
        started = time.monotonic()
        per_load = []
        for i, link in enumerate(links):
            t = time.monotonic()
            client.load_adapter(f"reg-{i:04d}", str(link))
            per_load.append(time.monotonic() - t)
        figures["register_s"] = time.monotonic() - started
        figures["load_p50_ms"] = statistics.median(per_load) * 1000
        figures["load_p95_ms"] = sorted(per_load)[int(0.95 * (len(per_load) - 1))] * 1000
        figures["rss_per_adapter_kib"] = (group_rss_mib(server.process.pid) - rss_before) * 1024 / count
        t = time.monotonic()
        listing = httpx.get(f"{server.base_url}/v1/models", timeout=30)
        figures["listing_ms"] = (time.monotonic() - t) * 1000
        figures["listing_kib"] = len(listing.content) / 1024

        def timed(name: str) -> float:
            t = time.monotonic()
            client.chat(name, QUESTION, GREEDY)
            return time.monotonic() - t

        # In pairs, the same adapter cold then warm at once: on a shared machine the load moves more
        # between seconds than between the two calls of a pair.
        resolved, evicted, warm, base = [], [], [], []
        for i in range(7):
            resolved.append(timed(f"cold-{i}"))  # never loaded: from the volume, by the resolver
            warm.append(timed(f"cold-{i}"))  # just used
            evicted.append(timed(f"reg-{i:04d}"))  # registered long ago, out of the 8-place cache
            warm.append(timed(f"reg-{i:04d}"))
            base.append(timed("doppel-tiny"))
    figures.update(
        resolved_ms=statistics.median(resolved) * 1000,
        evicted_ms=statistics.median(evicted) * 1000,
        warm_ms=statistics.median(warm) * 1000,
        base_ms=statistics.median(base) * 1000,
        resolved_ratio=statistics.median(c / w for c, w in zip(resolved, warm[0::2], strict=True)),
        evicted_ratio=statistics.median(c / w for c, w in zip(evicted, warm[1::2], strict=True)),
    )
    return figures, server


async def bot_cold_start(server: VllmServer, tmp: Path) -> dict[str, float]:
    # The gate's pipes are cancelled when it closes: not worth a traceback each.
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    emulator = SlackEmulator(rate_scale=1000.0).start()
    emulator.add_team(load_workspace(), token=ACME_TOKEN, bot_user_id=BOT_USER_ID)
    directory = MemoryDirectory()
    directory.add(doppel_body("alice", "U01ALICE", served_name="doppel-tiny"))
    gate = TcpGate(server.port)  # closed: the pool is at zero
    config = bot_config(  # the production poll (2 s) and estimate; SQL-backed ledger and held mentions
        vllm_url=gate.url, slack_api_url=emulator.base_url, database_url=f"sqlite:///{tmp / 'bot.db'}"
    )
    config = replace(config, wake_poll_s=2.0, max_tokens=8)
    bot = await BotHarness(create_bot(config, kube=directory), emulator).start()
    try:
        ts = say(emulator, "U02BOB", f"<@{BOT_USER_ID}> is the deploy at 5pm?")
        sent = time.monotonic()
        await bot.event(mention_payload(f"<@{BOT_USER_ID}> is the deploy at 5pm?", ts, event_id="EvBench"))
        await bot.wait_posts(CHANNEL, 1, timeout=30)
        note = time.monotonic() - sent
        await asyncio.sleep(max(0.0, POD_START_S - note))
        await gate.open()  # the pod is ready
        await bot.wait_posts(CHANNEL, 2, timeout=120)
        answer = time.monotonic() - sent
    finally:
        await bot.stop()
        await gate.close()
        emulator.stop()
    return {"note_s": note, "answer_s": answer}


def main() -> None:
    global RESYNC_S, WINDOW_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--resync", type=float, default=RESYNC_S, help="the operator's resync seconds")
    parser.add_argument("--window", type=float, default=WINDOW_S, help="seconds measured in steady state")
    parser.add_argument("--only", choices=["operator", "vllm"], help="run only parts 1, or 2-4")
    args = parser.parse_args()
    RESYNC_S, WINDOW_S = args.resync, args.window
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.only != "vllm":
        operator_part(args)
    if args.only != "operator":
        vllm_part(args)


def operator_part(args: argparse.Namespace) -> None:
    print(
        f"1. operator, {args.users} Ready DoppelUsers x {args.pods} vLLM pods, resync {RESYNC_S:.0f} s, "
        f"{WINDOW_S:.0f} s window in steady state"
    )
    new = asyncio.run(operator_scale(args.users, args.pods, None))
    with tempfile.TemporaryDirectory() as tmp:
        old = asyncio.run(operator_scale(args.users, args.pods, baseline_tree(Path(tmp))))
    header = (
        f"{'req/min':>9}{'lists/min':>10}{'MiB/min':>9}{'peak MiB':>9}{'CPU':>6}{'passes/min':>11}"
        f"{'mean s':>8}{'p95 s':>7}{'CPU ms/pass':>12}{'1st check s':>12}"
    )
    print(f"{'':28}{header}")
    for label, f in (("per-pod listing (now)", new), (f"per-user listing ({BASELINE_REF})", old)):
        print(
            f"{label:28}{f['requests_per_min']:9.0f}{f['listings_per_min']:10.0f}{f['mib_per_min']:9.1f}"
            f"{f['peak_mib']:9.1f}{f['cpu_share']:6.0%}{f['passes_per_min']:11.0f}{f['reconcile_mean_s']:8.2f}"
            f"{f['reconcile_p95_s']:7.1f}{f['cpu_ms_per_pass']:12.1f}{f['settle_s']:12.1f}"
        )
    print(
        "(CPU: the operator's share of one core in the window; a pass's time includes waiting for the event "
        "loop and the API server, its CPU ms do not; p95 is a histogram bucket's upper bound)"
    )
    ideal_old = args.users * args.pods * 60 / RESYNC_S
    print(
        f"old/new requests: {old['requests_per_min'] / max(new['requests_per_min'], 1):.0f}x "
        f"(the old scheme's due rate: {ideal_old:.0f}/min; "
        f"the new bound: {args.pods * 60 / RESYNC_S:.0f}/min)"
    )


def vllm_part(args: argparse.Namespace) -> None:
    if not os.environ.get("DOPPEL_VLLM_PYTHON"):
        print("2-4 skipped: $DOPPEL_VLLM_PYTHON is not set")
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-vllm-") as tmp:
        figures, server = vllm_figures(Path(tmp), args.adapters)
        try:
            print(
                f"2. real vLLM CPU server, tiny model (started in {figures['startup_s']:.0f} s): "
                f"{args.adapters} adapters registered in {figures['register_s']:.1f} s "
                f"(load p50 {figures['load_p50_ms']:.1f} ms, p95 {figures['load_p95_ms']:.1f} ms), "
                f"{figures['rss_per_adapter_kib']:.1f} KiB of server memory per adapter "
                f"(--max-cpu-loras 8); /v1/models then {figures['listing_kib']:.0f} KiB "
                f"in {figures['listing_ms']:.0f} ms"
            )
            print(
                f"3. first reply (8 tokens, median of 7, each cold call paired with a warm one at once): "
                f"adapter loaded from the volume by the resolver {figures['resolved_ms']:.0f} ms, registered "
                f"but evicted {figures['evicted_ms']:.0f} ms, warm {figures['warm_ms']:.0f} ms (base model "
                f"{figures['base_ms']:.0f} ms); cold/warm of the pairs {figures['resolved_ratio']:.2f}x and "
                f"{figures['evicted_ratio']:.2f}x"
            )
            cold = asyncio.run(bot_cold_start(server, Path(tmp)))
        finally:
            server.stop()
    own = cold["answer_s"] - POD_START_S - figures["warm_ms"] / 1000
    print(
        f"4. bot, pool at zero, pod start emulated as {POD_START_S:.0f} s: 'waking up' note after "
        f"{cold['note_s']:.2f} s, answer after {cold['answer_s']:.2f} s; the bot's own share "
        f"{own:.2f} s (held-mention poll every 2 s)"
    )


if __name__ == "__main__":
    main()
