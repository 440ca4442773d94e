"""Kubernetes Job manifests for the pipeline steps, their deterministic names, and reading their outcome.

Pure functions over plain dicts: no API calls here. A Job's outcome is the JSON summary that
`doppel.cli.run_stage` writes to $DOPPEL_RESULT_FILE, pointed at the container's termination-message path,
so the operator reads it from the pod's `state.terminated.message` and never scrapes logs.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from doppel.api import GROUP, KIND, VERSION, DoppelUserSpec, with_train_defaults
from doppel.operator import podspec
from doppel.operator.config import OperatorConfig

Step = Literal["scrape", "train", "cleanup", "purge", "prune"]
TERMINATION_LOG = "/dev/termination-log"
TOKEN_ENV = "SLACK_BOT_TOKEN"

MANAGED_BY = {"app.kubernetes.io/managed-by": "doppel-operator"}
L_USER = f"{GROUP}/user"
L_UID = f"{GROUP}/uid"
L_GENERATION = f"{GROUP}/generation"
L_STEP = f"{GROUP}/step"
L_ATTEMPT = f"{GROUP}/attempt"
# Set on a Job the operator gave up on (its pod never started): the reason, read back by `outcome`.
A_ABANDONED = f"{GROUP}/abandoned"
GPU_ENV = "DOPPEL_REQUIRE_GPU"

# Pod waiting reasons that need a person (a kubelet retries them forever on its own).
DISRUPTED = "DisruptionTarget"
STUCK_WAITING = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "InvalidImageName",
    }
)


@dataclass(frozen=True)
class Owner:
    """The DoppelUser a Job belongs to."""

    namespace: str
    name: str
    uid: str
    generation: int


def _short(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with a hash suffix when cut so distinct inputs stay distinct."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{text[: limit - 7].rstrip('-.')}-{digest}"


def job_name(owner: Owner, step: Step, attempt: int) -> str:
    """Deterministic per object, generation, step and attempt: a restarted operator finds its Jobs again,
    and creating one twice fails with 409 instead of running it twice. At most 63 characters, since
    the name also becomes the pods' `job-name` label."""
    suffix = f"-{owner.uid[:5]}-g{owner.generation}-{step}-{attempt}"
    return _short(owner.name, 63 - len(suffix)) + suffix


def served_name(namespace: str, name: str, version: int) -> str:
    """Name of an adapter in vLLM: unique per namespace, user and version (namespaces hold no dots)."""
    return f"{namespace}.{name}.v{version}"


def user_dir(config: OperatorConfig, namespace: str, name: str) -> str:
    return posixpath.join(config.data_root, namespace, name)


def dataset_dir(config: OperatorConfig, owner: Owner) -> str:
    return posixpath.join(user_dir(config, owner.namespace, owner.name), f"g{owner.generation}")


def adapter_dir(config: OperatorConfig, namespace: str, name: str, version: int) -> str:
    return posixpath.join(user_dir(config, namespace, name), "adapters", f"v{version}")


def labels(owner: Owner, step: Step, attempt: int) -> dict[str, str]:
    return {
        **MANAGED_BY,
        L_USER: _short(owner.name, 63),
        L_UID: owner.uid,
        L_GENERATION: str(owner.generation),
        L_STEP: step,
        L_ATTEMPT: str(attempt),
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def scrape_command(spec: DoppelUserSpec, config: OperatorConfig, owner: Owner) -> list[str]:
    slack, target, data = spec.slack, spec.target, spec.data
    command = ["doppel", "scrape", "--out", dataset_dir(config, owner)]
    if slack.export_path:
        command += ["--export", posixpath.join(config.data_root, slack.export_path)]
    else:
        command += ["--team", slack.team_id, "--rate-profile", slack.rate_profile]
        # One rate budget per workspace, shared by every scrape Job of it (see doppel.slack.ratelimit).
        command += ["--budget-dir", posixpath.join(config.data_root, ".slack-budget")]
        if config.slack_api_url:
            command += ["--slack-api-url", config.slack_api_url]
    command += ["--user", target.user_id or target.handle or target.real_name or ""]
    for channel in slack.channels.include:
        command += ["--channel", channel]
    for channel in slack.channels.exclude:
        command += ["--exclude-channel", channel]
    command += ["--cutoff-days", str(data.cutoff_days)]
    if data.min_length is not None:
        command += ["--min-length", str(data.min_length)]
    command += ["--max-samples", str(data.max_samples), "--json-progress"]
    if not data.scrub:
        command.append("--no-scrub")
    return command + list(config.scrape_args)


def train_command(
    spec: DoppelUserSpec, config: OperatorConfig, owner: Owner, serving: str | None = None
) -> list[str]:
    """`doppel train` for this generation; `serving`, the adapter serving now, is measured on the same
    held-out set for the fidelity gate."""
    t = spec.training
    # spec.training.batchSize is the effective batch: micro-batches of at most 4, accumulated.
    micro = min(4, t.batch_size)
    command = [
        "doppel",
        "train",
        "--data",
        posixpath.join(dataset_dir(config, owner), "samples.jsonl"),
        "--base-model",
        spec.base_model.path,
        "--base-model-name",
        spec.base_model.served_name,
        "--out",
        adapter_dir(config, owner.namespace, owner.name, owner.generation),
        "--rank",
        str(t.rank),
        "--alpha",
        str(t.alpha),
        "--epochs",
        str(t.epochs),
        "--batch-size",
        str(micro),
        "--grad-accum",
        str(-(-t.batch_size // micro)),
        "--min-samples",
        str(t.min_samples),
        "--json-progress",
        # The person's feedback and corrections, kept in the doppel's directory by the bot.
        "--feedback-from",
        user_dir(config, owner.namespace, owner.name),
    ]
    if t.learning_rate is not None:  # else `doppel train` takes the base model's own
        command += ["--lr", str(t.learning_rate)]
    if t.max_steps is not None:
        command += ["--max-steps-per-epoch", str(t.max_steps)]
    if serving:
        command += ["--compare-with", serving]
    if config.lora_dir:
        served = served_name(owner.namespace, owner.name, owner.generation)
        command += ["--link", posixpath.join(config.lora_dir, served)]
    return command + list(config.train_args)


def cleanup_command(config: OperatorConfig, paths: list[str], partials_in: tuple[str, ...] = ()) -> list[str]:
    partials = [arg for directory in partials_in for arg in ("--partials-in", directory)]
    # Removing an adapter leaves its resolver name pointing nowhere: those links go too.
    dangling = ["--dangling-in", config.lora_dir] if config.lora_dir else []
    return ["doppel", "cleanup", "--data-root", config.data_root, *partials, *dangling, *paths]


def job_manifest(
    owner: Owner,
    step: Step,
    attempt: int,
    command: list[str],
    spec: DoppelUserSpec,
    config: OperatorConfig,
) -> dict[str, Any]:
    """A one-pod Job running `command` in the worker image with the shared volume mounted.

    backoffLimit 0: retries are the operator's (with its own backoff and the bad-input rule)."""
    if step == "train":  # the cluster's defaults for what the object leaves out (GPU, node, taints)
        spec = with_train_defaults(spec, config.train_defaults)
    env: list[dict[str, Any]] = [{"name": "DOPPEL_RESULT_FILE", "value": TERMINATION_LOG}]
    if step == "scrape" and spec.slack.token_secret_ref and not spec.slack.export_path:
        ref = spec.slack.token_secret_ref
        env.append({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if step == "train":
        if config.hf_home:
            env.append({"name": "HF_HOME", "value": config.hf_home})
        if config.hf_token_secret:
            ref = {"name": config.hf_token_secret, "key": "HF_TOKEN", "optional": True}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
        if spec.resources.gpu:
            # A pod that asked for a GPU but sees none fails with that reason instead of training on CPU.
            env.append({"name": GPU_ENV, "value": "1"})
    container: dict[str, Any] = {
        "name": step,
        "image": podspec.image(step, config),
        "imagePullPolicy": config.image_pull_policy,
        "command": command,
        "env": env,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if config.data_claim:
        container["volumeMounts"] = [{"name": "data", "mountPath": config.data_root}]
        pod_spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": config.data_claim}}]
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    podspec.apply(pod_spec, container, step, spec, config)
    if step == "train":
        if spec.resources.gpu and config.gpu_runtime_class:
            pod_spec["runtimeClassName"] = config.gpu_runtime_class
        if spec.node_selector:
            pod_spec["nodeSelector"] = dict(spec.node_selector)
        if spec.tolerations:
            pod_spec["tolerations"] = [
                t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
            ]
    job_labels = labels(owner, step, attempt)
    # No ttlSecondsAfterFinished yet: a Job that ended while no operator ran would go with its outcome
    # unseen. The operator sets it once the status holds the outcome (reconcile.Plan.expire).
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(owner, step, attempt),
            "namespace": owner.namespace,
            "labels": job_labels,
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "backoffLimit": 0,
            # A hung Job fails (DeadlineExceeded) instead of holding its slot, and its GPU, forever.
            "activeDeadlineSeconds": config.deadlines_s.get(step, 3600),
            # A disruption (preemption, node drain) is no failure of the step: the Job starts a new pod.
            # status is defaulted by newer API servers, required by 1.29's schema.
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": DISRUPTED, "status": "True"}]}]
            },
            "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
        },
    }


@dataclass(frozen=True)
class Outcome:
    state: Literal["running", "succeeded", "failed"]
    result: dict[str, Any]  # the termination-message JSON (empty when there is none)
    reason: str = ""
    # Why Kubernetes ended it, when that is not the code's doing: OOMKilled, DeadlineExceeded, or the
    # reason its pod never started (Unschedulable, ImagePullBackOff...). Empty otherwise.
    code: str = ""

    @property
    def bad_input(self) -> bool:
        return self.state == "failed" and self.result.get("kind") == "bad_input"


@dataclass(frozen=True)
class Stuck:
    """A Job pod that cannot start by itself: the kubelet's or the scheduler's reason and message."""

    pod: str
    reason: str
    message: str
    since: datetime | None  # the pod's creation


def _disrupted(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == DISRUPTED and c.get("status") == "True" for c in conditions)


def counted(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods that speak for a Job: a disrupted one was replaced (podFailurePolicy Ignore)."""
    return [pod for pod in pods if not _disrupted(pod)]


def timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def stuck(pods: list[dict[str, Any]]) -> Stuck | None:
    """A Pending pod that waits for something only a person can fix, or None."""
    for pod in counted(pods):
        status = pod.get("status") or {}
        if status.get("phase") not in (None, "", "Pending"):
            continue
        name = pod.get("metadata", {}).get("name", "")
        since = timestamp(pod.get("metadata", {}).get("creationTimestamp"))
        containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
        for container in containers:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return Stuck(name, waiting["reason"], str(waiting.get("message") or ""), since)
        for cond in status.get("conditions") or []:
            unscheduled = cond.get("type") == "PodScheduled" and cond.get("status") == "False"
            if unscheduled and cond.get("reason") == "Unschedulable":
                return Stuck(name, "Unschedulable", str(cond.get("message") or ""), since)
    return None


def _terminated(pods: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(pod, terminated state) of the Job's finished container."""
    for pod in counted(pods):
        for status in pod.get("status", {}).get("containerStatuses") or []:
            if terminated := (status.get("state") or {}).get("terminated"):
                return pod, terminated
    return None


def _memory_hint(pod: dict[str, Any]) -> str:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    resources = containers[0].get("resources") or {}
    limit = (resources.get("limits") or {}).get("memory")
    request = (resources.get("requests") or {}).get("memory")
    has = f"limit {limit}" if limit else f"request {request}, no limit" if request else "no memory request"
    return (
        f"OOMKilled: the container ran out of memory ({has}); raise spec.resources.memory "
        "or lower spec.training.batchSize"
    )


def outcome(job: dict[str, Any], pods: list[dict[str, Any]]) -> Outcome:
    """What a Job came to, from its status and its pod's termination message."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    abandoned = (job.get("metadata", {}).get("annotations") or {}).get(A_ABANDONED)
    if status.get("succeeded") or "Complete" in conditions:
        state: Literal["running", "succeeded", "failed"] = "succeeded"
    elif abandoned:
        code = abandoned.split(":", 1)[0]
        return Outcome("failed", {}, abandoned, code)
    elif status.get("failed") or "Failed" in conditions:
        state = "failed"
    else:
        return Outcome("running", {})
    pod, terminated = _terminated(pods) or ({}, {})
    try:
        result = json.loads(terminated.get("message") or "{}")
    except json.JSONDecodeError:
        result = {}
    if not isinstance(result, dict):
        result = {}
    failed = conditions.get("Failed") or {}
    if state == "failed" and terminated.get("reason") == "OOMKilled":
        return Outcome(state, result, _memory_hint(pod), "OOMKilled")
    if state == "failed" and failed.get("reason") == "DeadlineExceeded" and not result:
        limit = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Outcome(state, result, f"DeadlineExceeded: still running after {limit}s", "DeadlineExceeded")
    reason = str(
        result.get("reason")
        or terminated.get("reason")
        or failed.get("message")
        or ("exit code " + str(terminated["exitCode"]) if "exitCode" in terminated else "")
    )
    return Outcome(state, result, reason)
