"""Pytest fixtures: kmock Kubernetes emulator and Job-controller fixtures (operator).

- `KubeCluster`: kmock's `KubernetesEmulator` served over HTTP on loopback, with the resources doppel uses
  declared (the DoppelUser CRD, Jobs, pods, Secrets, Events, namespaces...). `kubectl` acts like a user: it
  fills in what a real API server would at creation (uid, generation, creationTimestamp); the emulator
  bumps the generation on spec changes. Every request is recorded; `operator_requests()` gives the
  operator's own as RBAC triples.
- `JobController`: plays the Job controller and kubelet kmock lacks. Each new Job's container command runs
  as a local process with the Job's env (secretKeyRef resolved from the emulator's Secrets); a pod object
  shows it Running, then terminated with the message the process wrote to $DOPPEL_RESULT_FILE, and the
  Job's status says Complete or Failed. `hold(step)` keeps a step's Jobs running until `release(step)`.
  `pause_when(step, until)` freezes a step's process (SIGSTOP, as a slow GPU would look from outside) once
  its output satisfies `until`, until the test resumes it. The process's stdout and stderr, as the
  kubelet keeps them, are served on the pod's `log` subresource (`GET .../pods/NAME/log?tailLines=N
  &container=C`), while it runs and after.
- `OperatorProcess`: the real operator (doppel.operator.handlers under kopf) in-process, started,
  killed and restarted by tests.
- `vllm_pod(...)`: a pod object standing for a real vLLM server on 127.0.0.1.
- fixtures `kube` (cluster + Job controller, namespace "team") and `operator_config`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml

from doppel.api import GROUP, PLURAL, VERSION
from doppel.operator.config import OperatorConfig

ROOT = Path(__file__).resolve().parents[2]
TEST_AGENT = "doppel-tests"
NAMESPACE = "team"

# (group/version/plural, kind, namespaced, subresources)
RESOURCES: list[tuple[str, str, bool, tuple[str, ...]]] = [
    (f"{GROUP}/{VERSION}/{PLURAL}", "DoppelUser", True, ("status",)),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, ()),
    ("v1/namespaces", "Namespace", False, ()),
    ("v1/events", "Event", True, ()),
    ("v1/pods", "Pod", True, ("status", "log")),
    ("v1/secrets", "Secret", True, ()),
    ("batch/v1/jobs", "Job", True, ("status",)),
    # kopf's peering objects: replicas record themselves there and only the highest priority acts.
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, ()),
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, ()),
]
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _path(api_version: str, plural: str, namespace: str | None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


PLURALS = {
    "DoppelUser": PLURAL,
    "Job": "jobs",
    "Pod": "pods",
    "Secret": "secrets",
    "Namespace": "namespaces",
    "KopfPeering": "kopfpeerings",
    "ClusterKopfPeering": "clusterkopfpeerings",
}
API_VERSIONS = {
    "DoppelUser": f"{GROUP}/{VERSION}",
    "Job": "batch/v1",
    "KopfPeering": "kopf.dev/v1",
    "ClusterKopfPeering": "kopf.dev/v1",
}


class Kubectl:
    """A user's view of the API: create/get/patch/delete over HTTP, as kubectl would."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, headers={"User-Agent": TEST_AGENT}, timeout=30)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        # What the API server fills in (kmock stores the body as sent).
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", _now())
        meta.setdefault("resourceVersion", "1")
        path = _path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"))
        response = await self.http.post(path, json=obj)
        response.raise_for_status()
        return dict(response.json())

    async def get(self, kind: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.get(_path(api, PLURALS[kind], namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    async def list(self, kind: str, namespace: str | None = NAMESPACE) -> list[dict[str, Any]]:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.get(_path(api, PLURALS[kind], namespace))
        response.raise_for_status()
        return list(response.json()["items"])

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = NAMESPACE) -> None:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.patch(
            _path(api, PLURALS[kind], namespace, name),
            content=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()

    async def patch_status(
        self, kind: str, name: str, status: dict[str, Any], namespace: str = NAMESPACE
    ) -> None:
        api = {"Job": "batch/v1"}.get(kind, "v1")
        response = await self.http.patch(
            _path(api, PLURALS[kind], namespace, name) + "/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()

    async def delete(self, kind: str, name: str, namespace: str | None = NAMESPACE) -> None:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.delete(_path(api, PLURALS[kind], namespace, name))
        response.raise_for_status()

    async def secret(self, name: str, data: dict[str, str], namespace: str = NAMESPACE) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        await self.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace},
                "data": encoded,
            }
        )

    async def events(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        response = await self.http.get(_path("v1", "events", namespace))
        response.raise_for_status()
        return list(response.json()["items"])


class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator, plus two API-server duties doppel relies on: names from generateName (kopf's
    Events) and a new metadata.generation on every spec change.

    With `record=False` it forgets requests once served: kmock matches each request against its whole
    request history, which grows quadratic under a benchmark's thousands of requests."""

    record: bool = True
    _inflight: set[int] | None = None

    async def _handle(self, request: Any) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
        key = (request.resource, request.namespace, request.name)
        changes_spec = isinstance(request.data, dict) and "spec" in request.data and not request.subresource
        if request.action == kmock.action.UPDATE and changes_spec and key in self.objects:
            # As the API server does: every spec change is a new generation.
            generation = int((self.objects[key].get("metadata") or {}).get("generation") or 1)
            request.data.setdefault("metadata", {})["generation"] = generation + 1
        if self.record:
            return await super()._handle(request)
        if self._inflight is None:
            self._inflight = set()
        self._inflight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self._inflight]
        try:
            return await super()._handle(request)
        finally:
            self._inflight.discard(id(request))


class KubeCluster:
    """kmock's Kubernetes emulator on a loopback port, with doppel's resources declared."""

    def __init__(self, *, record: bool = True) -> None:
        self.emulator = Emulator()
        self.emulator.record = record
        for key, kind, namespaced, subresources in RESOURCES:
            self.emulator.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources
            )
        self._server: kmock.Server | None = None
        self.kubectl: Kubectl
        # (namespace, pod) -> (container, file holding its output): what the kubelet would serve as logs.
        self.pod_logs: dict[tuple[str, str], tuple[str, Path]] = {}
        pods = kmock.resource("", "v1", "pods")
        self.emulator[pods][kmock.subresource("log")] << self._serve_log

    def _serve_log(self, request: Any) -> bytes:
        """GET pods/NAME/log: the container's output so far, the last `tailLines` lines if asked."""
        found = self.pod_logs.get((request.namespace, request.name))
        if found is None:
            raise kmock.KubernetesObjectNotFoundError()
        container, path = found
        if request.params.get("container", container) != container:
            raise kmock.KubernetesObjectNotFoundError()
        lines = path.read_bytes().splitlines(keepends=True) if path.exists() else []
        tail = request.params.get("tailLines")
        return b"".join(lines[max(0, len(lines) - int(tail)) :] if tail is not None else lines)

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.url).rstrip("/")

    async def start(self) -> None:
        # Entered as a context manager, kmock answers errors (404, 409) as Kubernetes Status objects.
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator)
        await self._server.__aenter__()
        self.kubectl = Kubectl(self.url)
        crd = yaml.safe_load((ROOT / "crds" / "doppelusers.yaml").read_text())
        await self.kubectl.http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
        # kmock cannot parse POST /api/v1/namespaces; put the namespace in place directly.
        namespaces = kmock.resource("", "v1", "namespaces")
        self.emulator.objects[namespaces, None, NAMESPACE] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "uid": str(uuid.uuid4())},
        }

    async def stop(self) -> None:
        await self.kubectl.aclose()
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)

    def jobs(self) -> list[dict[str, Any]]:
        """Every Job the emulator holds (read in memory, not over the API: not counted as a request)."""
        found = []
        for key in list(self.emulator.objects):
            resource, _, _ = key
            obj = self.emulator.objects[key]
            if resource.plural == "jobs" and not obj.deleted:
                found.append(json.loads(json.dumps(dict(obj.raw))))
        return found

    def operator_requests(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource[/subresource], verb) of every API request not made by the tests."""
        verbs = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}
        seen: set[tuple[str, str, str]] = set()
        for request in self.emulator:
            if request.headers.get("User-Agent", "").startswith(TEST_AGENT) or request.resource is None:
                continue
            if not request.resource.plural:
                continue  # API discovery: open to every authenticated client
            action = request.action.name if request.action is not None else ""
            verb = verbs.get(action) or {"PATCH": "patch", "PUT": "update"}.get(
                str(request.method.value).upper()
            )
            if verb is None:
                continue
            resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            seen.add((request.resource.group or "", resource, verb))
        return seen


@dataclass
class JobRun:
    name: str
    process: asyncio.subprocess.Process | None = None
    returncode: int | None = None
    log: Path | None = None


@dataclass
class Pause:
    """A running Job frozen mid-way: `reached` once frozen, running again after `resume()`."""

    until: Callable[[str], bool]
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    def resume(self) -> None:
        self.go.set()


@dataclass
class JobController:
    """Runs each Job's command locally and writes the Job's and its pod's status back."""

    cluster: KubeCluster
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    runs: dict[str, JobRun] = field(default_factory=dict)
    _held: dict[str, asyncio.Event] = field(default_factory=dict)
    _pauses: dict[str, Pause] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _loop: asyncio.Task[None] | None = None

    def hold(self, step: str) -> None:
        """Jobs of this step (label doppel.dev/step) start but wait, Running, until released."""
        self._held[step] = asyncio.Event()

    def release(self, step: str) -> None:
        if event := self._held.pop(step, None):
            event.set()

    def pause_when(self, step: str, until: Callable[[str], bool]) -> Pause:
        """Freeze this step's running process once its output so far satisfies `until` (replaces the
        step's previous pause, so a test can arm the next one before resuming the current)."""
        pause = Pause(until)
        self._pauses[step] = pause
        return pause

    async def _pauser(self, step: str, run: JobRun) -> None:
        """Poll the output of `run`; SIGSTOP it when the step's current pause is due, SIGCONT on resume."""
        assert run.process is not None and run.log is not None
        while run.process.returncode is None:
            pause = self._pauses.get(step)
            if pause is not None and not pause.reached.is_set() and pause.until(run.log.read_text()):
                run.process.send_signal(signal.SIGSTOP)
                pause.reached.set()
                try:
                    await pause.go.wait()
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        run.process.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        for step in list(self._held):
            self.release(step)
        for pause in self._pauses.values():
            pause.resume()
        for task in [self._loop, *self._tasks]:
            if task is not None:
                task.cancel()
        for run in self.runs.values():
            if run.process is not None and run.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    run.process.kill()
        for task in [self._loop, *self._tasks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _watch(self) -> None:
        while True:
            for job in self.cluster.jobs():
                name = job["metadata"]["name"]
                if name not in self.runs and not job.get("status"):
                    self.runs[name] = JobRun(name)
                    self._tasks.append(asyncio.create_task(self._run(job)))
            await asyncio.sleep(0.1)

    async def _env(self, job: dict[str, Any], container: dict[str, Any], result_file: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.extra_env)
        namespace = job["metadata"]["namespace"]
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                secret = await self.cluster.kubectl.get("Secret", ref["name"], namespace)
                if secret is None or ref["key"] not in (secret.get("data") or {}):
                    raise LookupError(
                        f"secret {ref['name']}/{ref['key']} missing"
                    )  # kubelet: CreateContainerConfigError
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        # Kubernetes' termination-message path, per Job here.
        env["DOPPEL_RESULT_FILE"] = str(result_file)
        return env

    async def _run(self, job: dict[str, Any]) -> None:
        kubectl = self.cluster.kubectl
        meta = job["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        template = job["spec"]["template"]
        container = template["spec"]["containers"][0]
        labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": name}
        labels["batch.kubernetes.io/job-name"] = name
        pod_name = f"{name}-pod"
        await kubectl.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": namespace, "labels": labels},
                "spec": template["spec"],
                "status": {"phase": "Running", "startTime": _now()},
            }
        )
        await kubectl.patch_status("Job", name, {"active": 1, "startTime": _now()}, namespace)
        run = self.runs[name]
        run.log = self.workdir / f"{name}.log"
        self.cluster.pod_logs[namespace, pod_name] = (container["name"], run.log)
        result_file = self.workdir / f"{name}.result"
        step = labels.get(f"{GROUP}/step", "")
        if held := self._held.get(step):
            await held.wait()
        try:
            env = await self._env(job, container, result_file)
            with run.log.open("wb") as log:
                run.process = await asyncio.create_subprocess_exec(
                    *container["command"],
                    env=env,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=self.workdir,
                )
                pauser = asyncio.create_task(self._pauser(step, run))
                try:
                    run.returncode = await run.process.wait()
                finally:
                    pauser.cancel()
        except LookupError as exc:
            run.returncode = 1
            result_file.write_text(json.dumps({"ok": False, "kind": "error", "reason": str(exc)}))
        message = result_file.read_text() if result_file.exists() else ""
        ok = run.returncode == 0
        terminated = {
            "exitCode": run.returncode,
            "reason": "Completed" if ok else "Error",
            "message": message,
            "finishedAt": _now(),
        }
        await kubectl.patch_status(
            "Pod",
            pod_name,
            {
                "phase": "Succeeded" if ok else "Failed",
                "containerStatuses": [{"name": container["name"], "state": {"terminated": terminated}}],
            },
            namespace,
        )
        condition = {"type": "Complete" if ok else "Failed", "status": "True", "lastTransitionTime": _now()}
        await kubectl.patch_status(
            "Job",
            name,
            {
                "active": None,
                "succeeded": 1 if ok else None,
                "failed": None if ok else 1,
                "conditions": [condition],
            },
            namespace,
        )


class OperatorProcess:
    """The operator under kopf, as `doppel operator` runs it, in its own thread and event loop.

    Its own loop because kopf, when it stops, cancels every task created in its loop after it started
    (it cannot tell its own apart): the emulator and the Job controller must not live there."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        from doppel.operator.handlers import run

        loop = asyncio.new_event_loop()
        self._loop = loop
        self._task = loop.create_task(run(self.config, stop_flag=self._stop, ready_flag=self._ready))
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            # kopf waits for a threading.Event stop flag in an executor thread; after a kill nothing
            # else sets it, and that thread would block the interpreter's exit forever.
            self._stop.set()
            loop.close()

    async def start(self) -> None:
        # Fresh flags: the previous run (if any) left its stop flag set.
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(self._ready.wait, 30):
            raise RuntimeError(f"the operator did not start: {self.error!r}")

    async def _join(self) -> None:
        assert self._thread is not None
        await asyncio.to_thread(self._thread.join, 60)
        assert not self._thread.is_alive(), "the operator did not stop"
        self._thread = None

    async def stop(self) -> None:
        """A graceful stop (SIGTERM-like)."""
        if self._thread is None:
            return
        self._stop.set()
        await self._join()

    async def kill(self) -> None:
        """An abrupt end: the operator is cancelled wherever it is, nothing gets to finish its work."""
        if self._thread is None:
            return
        assert self._loop is not None and self._task is not None
        self._loop.call_soon_threadsafe(self._task.cancel)
        await self._join()


def vllm_pod(
    name: str, port: int, labels: dict[str, str] | None = None, ready: bool = True
) -> dict[str, Any]:
    """A pod object standing for a vLLM server listening on 127.0.0.1:port."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": labels or {"app.kubernetes.io/name": "vllm"},
        },
        "spec": {"containers": [{"name": "vllm", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@dataclass
class Kube:
    cluster: KubeCluster
    jobs: JobController
    kubectl: Kubectl

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 120,
        what: str = "",
    ) -> dict[str, Any]:
        """Poll the DoppelUser until `predicate(obj)` holds; fail with its last status otherwise."""
        deadline = asyncio.get_running_loop().time() + timeout
        obj: dict[str, Any] | None = None
        while asyncio.get_running_loop().time() < deadline:
            obj = await self.kubectl.get("DoppelUser", name)
            if obj is not None and predicate(obj):
                return obj
            await asyncio.sleep(0.2)
        logs = {n: r.log.read_text()[-800:] for n, r in self.jobs.runs.items() if r.log and r.log.exists()}
        status = json.dumps((obj or {}).get("status"), indent=1)
        raise AssertionError(f"timed out waiting for {what or name}; status: {status}; job logs: {logs}")

    async def wait_for_events(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
    ) -> list[dict[str, Any]]:
        """Poll the namespace's Events until `predicate(events)` holds: kopf posts Events from a
        background task, so they can land a moment after the status change they describe."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            events = await self.kubectl.events()
            if predicate(events) or asyncio.get_running_loop().time() >= deadline:
                return events
            await asyncio.sleep(0.2)


@pytest.fixture
def operator_config(tmp_path: Path, kube: Kube) -> OperatorConfig:
    """Test settings: data root in tmp (shared by local Jobs and local vLLM), fast loops."""
    return OperatorConfig(
        data_root=str(tmp_path / "data"),
        data_claim=None,
        worker_image="doppel-worker:test",
        api_server=kube.cluster.url,
        backoff_s=0.5,
        max_backoff_s=2.0,
        resync_s=1.0,
    )


def config_with(config: OperatorConfig, **changes: Any) -> OperatorConfig:
    return replace(config, **changes)


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Kube]:
    cluster = KubeCluster()
    await cluster.start()
    workdir = tmp_path / "jobs"
    workdir.mkdir()
    controller = JobController(cluster, workdir)
    controller.start()
    try:
        yield Kube(cluster, controller, cluster.kubectl)
    finally:
        await controller.stop()
        await cluster.stop()
