"""Pytest fixtures: kmock Kubernetes emulator and Job-controller fixtures (operator).

- `KubeCluster`, `Kubectl`, `Emulator` (tests.support.kube_emulator, re-exported here): the kmock Kubernetes
  emulator on loopback and a user's view of it.
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
- fixtures `kube` (cluster + Job controller, namespace "team") and `operator_config`; kmock's own `kmock`
  fixture serves the same `Emulator`.
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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from doppel.api import GROUP, PLURAL
from doppel.operator.config import OperatorConfig
from tests.support.kube_emulator import API_VERSIONS as API_VERSIONS
from tests.support.kube_emulator import INVALID_MESSAGE as INVALID_MESSAGE
from tests.support.kube_emulator import NAMESPACE, Emulator, KubeCluster, Kubectl, _now
from tests.support.kube_emulator import PLURALS as PLURALS
from tests.support.kube_emulator import QUOTA_MESSAGE as QUOTA_MESSAGE
from tests.support.kube_emulator import TEST_AGENT as TEST_AGENT


@dataclass
class JobRun:
    name: str
    process: asyncio.subprocess.Process | None = None
    returncode: int | None = None
    log: Path | None = None
    step: str = ""
    pod: str = ""  # its current pod
    started: float | None = None  # loop time the Job started
    deadline: float | None = None  # its activeDeadlineSeconds
    finished: bool = False
    ended: float | None = None  # wall-clock time its status said Complete or Failed
    namespace: str = NAMESPACE
    pods: list[str] = field(default_factory=list)  # every pod it had
    collected: bool = False  # its Job is gone, and with it (the garbage collector's part) its pods
    # Set, with `why`, when something outside the process ends it: the Job deleted or suspended, its
    # deadline passed, its pod disrupted.
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""

    def interrupt(self, why: str) -> None:
        if not self.interrupted.is_set():
            self.why = why
            self.interrupted.set()


@dataclass
class Pause:
    """A running Job frozen mid-way: `reached` once frozen, running again after `resume()`."""

    until: Callable[[str], bool]
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    def resume(self) -> None:
        self.go.set()


@dataclass
class Stuck:
    """Pods of a step that stay Pending as the scheduler or kubelet leave them, until `clear()`."""

    reason: str  # Unschedulable, or a container waiting reason (ImagePullBackOff, ErrImagePull...)
    message: str
    cleared: asyncio.Event = field(default_factory=asyncio.Event)

    def clear(self) -> None:
        self.cleared.set()

    def pod_status(self, container: str) -> dict[str, Any]:
        if self.reason == "Unschedulable":
            scheduled = {"type": "PodScheduled", "status": "False", "reason": self.reason}
            return {"phase": "Pending", "conditions": [{**scheduled, "message": self.message}]}
        waiting = {"reason": self.reason, "message": self.message}
        return {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": container, "ready": False, "state": {"waiting": waiting}}],
        }


def _ignores_disruption(job: dict[str, Any]) -> bool:
    """The Job's podFailurePolicy lets a disrupted pod go without counting it (action Ignore)."""
    rules = ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []
    return any(
        rule.get("action") == "Ignore"
        and any(c.get("type") == "DisruptionTarget" for c in rule.get("onPodConditions") or [])
        for rule in rules
    )


@dataclass
class JobController:
    """Plays the Job controller, scheduler and kubelet: runs each Job's command locally and writes the
    Job's and its pod's status back, as the real ones do, failures included:

    - `stick(step, reason, message)`: the step's pods stay Pending (Unschedulable, ImagePullBackOff,
      ContainerCreating...); `event(...)` adds what the kubelet or the autoscaler say about them;
    - `refuse_pods(step, message)`: admission refuses the step's pods (a quota, Pod Security): the Job gets
      no pod, only FailedCreate Events, as the real Job controller leaves it, until cleared;
    - `disrupt(step)`: the running pod is evicted (condition DisruptionTarget, as preemption or a node
      drain leave it); the Job's podFailurePolicy decides between a new pod and a failed Job;
    - `oom(step)`: the step's next container is killed by the kernel (OOMKilled, exit code 137);
    - `activeDeadlineSeconds`: a Job running longer fails with DeadlineExceeded, its pod deleted;
    - `ttlSecondsAfterFinished`: a finished Job (condition Complete or Failed) is deleted that long after it
      ended, its pods with it; as the TTL-after-finished controller, it reads the Job as it is now, so a
      TTL set after the Job finished counts too (from when it ended: at once if that is past);
    - a suspended Job loses its pod (condition Suspended); a deleted Job's pod is deleted, and a Job whose
      owning DoppelUser is gone is deleted (the garbage collector's part).
    """

    cluster: KubeCluster
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    runs: dict[str, JobRun] = field(default_factory=dict)
    _held: dict[str, asyncio.Event] = field(default_factory=dict)
    _pauses: dict[str, Pause] = field(default_factory=dict)
    _stuck: dict[str, Stuck] = field(default_factory=dict)
    _refused: dict[str, Stuck] = field(default_factory=dict)
    ttl_deleted: list[str] = field(default_factory=list)  # Jobs the TTL-after-finished controller deleted
    collected: list[str] = field(default_factory=list)  # Jobs the garbage collector deleted (owner gone)
    _oom: set[str] = field(default_factory=set)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _loop: asyncio.Task[None] | None = None

    def hold(self, step: str) -> None:
        """Jobs of this step (label doppel.dev/step) start but wait, Running, until released."""
        self._held[step] = asyncio.Event()

    def release(self, step: str) -> None:
        if event := self._held.pop(step, None):
            event.set()

    def stick(self, step: str, reason: str, message: str) -> Stuck:
        """Pods of this step stay Pending with `reason` until the returned handle is cleared."""
        stuck = Stuck(reason, message)
        self._stuck[step] = stuck
        return stuck

    def refuse_pods(self, step: str, message: str) -> Stuck:
        """Pods of this step are refused at creation (`message`: the admission's words) until cleared."""
        refused = Stuck("FailedCreate", message)
        self._refused[step] = refused
        return refused

    async def event(self, kind: str, name: str, reason: str, message: str, component: str) -> None:
        """An Event about an object, as the Job controller, a kubelet or the cluster autoscaler post it."""
        await self.cluster.kubectl.create(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{name}.", "namespace": NAMESPACE},
                "involvedObject": {"kind": kind, "name": name, "namespace": NAMESPACE},
                "reason": reason,
                "message": message,
                "type": "Normal" if reason == "TriggeredScaleUp" else "Warning",
                "source": {"component": component},
                "lastTimestamp": _now(),
                "count": 1,
            }
        )

    def current_pod(self, step: str) -> str:
        """The pod of this step's newest Job ("" before it has one)."""
        runs = [r for r in self.runs.values() if r.step == step]
        return runs[-1].pod if runs else ""

    def oom(self, step: str) -> None:
        """The next container of this step runs out of memory."""
        self._oom.add(step)

    def disrupt(self, step: str) -> str:
        """Evict the running pod of this step's Job (the newest started); returns the Job's name."""
        running = [r for r in self.runs.values() if r.step == step and r.process and r.returncode is None]
        assert running, f"no running {step} Job to disrupt"
        running[-1].interrupt("disrupted")
        return running[-1].name

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
        for stuck in [*self._stuck.values(), *self._refused.values()]:
            stuck.clear()
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
        loop = asyncio.get_running_loop()
        while True:
            present = {job["metadata"]["name"]: job for job in self.cluster.jobs()}
            for name, job in present.items():
                if name not in self.runs and not job.get("status") and not job["spec"].get("suspend"):
                    self.runs[name] = JobRun(name)
                    self._tasks.append(asyncio.create_task(self._run(job)))
            await self._ttl_and_owners(present)
            for name, run in self.runs.items():
                job = present.get(name)
                if job is None and run.started and not run.collected:
                    run.collected = True
                    self._tasks.append(asyncio.create_task(self._collect(run.namespace, run)))
                if run.finished:
                    continue
                if job is None:
                    run.interrupt("deleted")
                elif job["spec"].get("suspend"):
                    run.interrupt("suspended")
                elif run.deadline is not None and run.started and loop.time() - run.started > run.deadline:
                    run.interrupt("deadline")
            await asyncio.sleep(0.1)

    async def _ttl_and_owners(self, present: dict[str, dict[str, Any]]) -> None:
        """The TTL-after-finished controller and the garbage collector's part for Jobs: a finished Job whose
        ttlSecondsAfterFinished has run out since it ended goes; so does one whose DoppelUser is gone."""
        objects = self.cluster.emulator.objects
        owners = {
            (objects[key].raw.get("metadata") or {}).get("uid")
            for key in list(objects)
            if key[0] is not None and key[0].plural == PLURAL and not objects[key].deleted
        }
        for name, job in present.items():
            meta = job["metadata"]
            refs = [r for r in meta.get("ownerReferences") or [] if r.get("kind") == "DoppelUser"]
            if refs and not any(r.get("uid") in owners for r in refs):
                with contextlib.suppress(httpx.HTTPStatusError):
                    await self.cluster.kubectl.delete("Job", name, meta["namespace"])
                self.collected.append(name)
                continue
            ttl = job["spec"].get("ttlSecondsAfterFinished")
            ended = self._ended(job)
            if ttl is not None and ended is not None and time.time() >= ended + ttl:
                with contextlib.suppress(httpx.HTTPStatusError):
                    await self.cluster.kubectl.delete("Job", name, meta["namespace"])
                self.ttl_deleted.append(name)

    def _ended(self, job: dict[str, Any]) -> float | None:
        """When the Job finished (wall clock), None while it has not (a suspended one never has)."""
        for cond in (job.get("status") or {}).get("conditions") or []:
            if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
                run = self.runs.get(job["metadata"]["name"])
                if run is not None and run.ended is not None:
                    return run.ended
                at = dt.datetime.fromisoformat(str(cond.get("lastTransitionTime")).replace("Z", "+00:00"))
                return at.timestamp()
        return None

    async def _collect(self, namespace: str, run: JobRun) -> None:
        """The garbage collector: a deleted Job's pods go too (propagationPolicy Background)."""
        while not run.finished:
            await asyncio.sleep(0.1)
        for pod in run.pods:
            with contextlib.suppress(httpx.HTTPStatusError):
                await self.cluster.kubectl.delete("Pod", pod, namespace)

    async def _env(self, job: dict[str, Any], container: dict[str, Any], result_file: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.extra_env)
        namespace = job["metadata"]["namespace"]
        for item in container.get("env") or []:
            if item["name"] == "HOME":
                continue  # a path inside the pod's own filesystem; this local process keeps the machine's
            if "value" in item:
                env[item["name"]] = item["value"]
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                secret = await self.cluster.kubectl.get("Secret", ref["name"], namespace)
                if secret is None or ref["key"] not in (secret.get("data") or {}):
                    if ref.get("optional"):
                        continue
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
        run = self.runs[name]
        run.step = (meta.get("labels") or {}).get(f"{GROUP}/step", "")
        run.namespace = namespace
        run.deadline = job["spec"].get("activeDeadlineSeconds")
        run.started = asyncio.get_running_loop().time()
        await kubectl.patch_status("Job", name, {"active": 1, "startTime": _now()}, namespace)
        pods = 0
        while True:
            pods += 1
            run.pod = f"{name}-pod" if pods == 1 else f"{name}-pod-{pods}"
            run.pods.append(run.pod)
            end = await self._run_pod(job, run)
            if end == "disrupted" and _ignores_disruption(job):
                # podFailurePolicy Ignore: the failure does not count, a new pod takes over.
                run.interrupted.clear()
                continue
            break
        run.finished = True
        now = _now()
        if end in ("suspended", "deadline"):
            # The Job controller (or the garbage collector) deletes the pod.
            with contextlib.suppress(httpx.HTTPStatusError):
                await kubectl.delete("Pod", run.pod, namespace)
        if end == "deleted":
            return
        if end == "suspended":
            suspended = {
                "type": "Suspended",
                "status": "True",
                "reason": "JobSuspended",
                "lastTransitionTime": now,
            }
            await kubectl.patch_status("Job", name, {"active": None, "conditions": [suspended]}, namespace)
            return
        ok = end == "exited" and run.returncode == 0
        run.ended = time.time()  # its TTL, if it has or gets one, counts from here (`_ttl_and_owners`)
        condition = {"type": "Complete" if ok else "Failed", "status": "True", "lastTransitionTime": now}
        if end == "deadline":
            condition |= {
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
            }
        elif not ok:
            condition |= {
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
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

    async def _run_pod(self, job: dict[str, Any], run: JobRun) -> str:
        """One pod of the Job, from creation to its end: "exited" (see run.returncode) or why it was
        interrupted."""
        kubectl = self.cluster.kubectl
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        template = job["spec"]["template"]
        container = template["spec"]["containers"][0]
        labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": name}
        labels["batch.kubernetes.io/job-name"] = name
        run.process, run.returncode = None, None
        refused = self._refused.get(run.step)
        if refused is not None and not refused.cleared.is_set():
            # The Job controller's words; it retries on its own backoff, creating nothing meanwhile.
            message = f'Error creating: pods "{run.pod}" is forbidden: {refused.message}'
            await self.event("Job", name, "FailedCreate", message, "job-controller")
            cleared = asyncio.create_task(refused.cleared.wait())
            interrupted = asyncio.create_task(run.interrupted.wait())
            await asyncio.wait({cleared, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            cleared.cancel()
            interrupted.cancel()
            if run.interrupted.is_set():
                return run.why
        stuck = self._stuck.get(run.step)
        if stuck is not None and stuck.cleared.is_set():
            stuck = None
        running = {"phase": "Running", "startTime": _now()}
        await kubectl.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": run.pod, "namespace": namespace, "labels": labels},
                "spec": template["spec"],
                "status": stuck.pod_status(container["name"]) if stuck else running,
            }
        )
        run.log = self.workdir / f"{run.pod}.log"
        self.cluster.pod_logs[namespace, run.pod] = (container["name"], run.log)
        result_file = self.workdir / f"{run.pod}.result"
        oom = False

        async def work() -> None:
            nonlocal oom
            if stuck is not None:
                await stuck.cleared.wait()
                await kubectl.patch_status(
                    "Pod", run.pod, {**running, "conditions": None, "containerStatuses": None}, namespace
                )
            if held := self._held.get(run.step):
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
                    if run.step in self._oom:
                        self._oom.discard(run.step)
                        oom = True
                        run.process.kill()
                    pauser = asyncio.create_task(self._pauser(run.step, run))
                    try:
                        run.returncode = await run.process.wait()
                    finally:
                        pauser.cancel()
                        if run.process.returncode is None:
                            run.process.kill()
                            run.returncode = await run.process.wait()
            except LookupError as exc:
                run.returncode = 1
                result_file.write_text(json.dumps({"ok": False, "kind": "error", "reason": str(exc)}))

        worker = asyncio.create_task(work())
        interrupted = asyncio.create_task(run.interrupted.wait())
        await asyncio.wait({worker, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        if not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        interrupted.cancel()
        if run.interrupted.is_set():
            if run.why == "disrupted":
                killed = {"exitCode": 137, "reason": "Error", "finishedAt": _now()}
                disruption = {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "Preempted in order to admit critical pod",
                }
                await kubectl.patch_status(
                    "Pod",
                    run.pod,
                    {
                        "phase": "Failed",
                        "conditions": [disruption],
                        "containerStatuses": [{"name": container["name"], "state": {"terminated": killed}}],
                    },
                    namespace,
                )
            return run.why
        message = result_file.read_text() if result_file.exists() else ""
        ok = run.returncode == 0
        terminated = {
            "exitCode": 137 if oom else run.returncode,
            "reason": "OOMKilled" if oom else "Completed" if ok else "Error",
            "message": message,
            "finishedAt": _now(),
        }
        await kubectl.patch_status(
            "Pod",
            run.pod,
            {
                "phase": "Succeeded" if ok else "Failed",
                "containerStatuses": [{"name": container["name"], "state": {"terminated": terminated}}],
            },
            namespace,
        )
        return "exited"


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


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """kmock's own `kmock` fixture serves doppel's `Emulator` (resourceVersions, 409 on a stale one, names
    from generateName): the bot's tests (bot_fixtures.bot_kube) race replicas on it."""
    return {**kmock_options, "cls": Emulator}
