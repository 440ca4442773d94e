"""What the cluster's settings put into every Job pod: Pod Security "restricted", resources, priority,
scheduling and extra environment (OperatorConfig.jobs). Pure functions over plain dicts; jobs.py builds
the rest of the Job around them.

Every Job pod passes the "restricted" Pod Security Standard: it runs as the worker images' non-root user
with the RuntimeDefault seccomp profile, its container may not escalate privileges, drops every capability
and has a read-only root filesystem (an emptyDir at /tmp, which is also HOME, takes caches). Every
container requests CPU and memory and has a memory limit, so quota namespaces admit it; a train pod is
Burstable (its memory limit equals its request), never BestEffort, the first a node evicts.
"""

from __future__ import annotations

from typing import Any

from doppel.api import DoppelUserSpec
from doppel.operator.config import RESTRICTED_POD, OperatorConfig

# Steps that need no GPU and no torch: they run in the small CPU worker image.
CPU_STEPS = frozenset({"scrape", "cleanup", "purge", "prune"})
TMP = "/tmp"

CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def image(step: str, config: OperatorConfig) -> str:
    if step in CPU_STEPS and config.jobs.cpu_image:
        return config.jobs.cpu_image
    return config.worker_image


def pod_security_context(config: OperatorConfig) -> dict[str, Any]:
    """Restricted defaults, then the volume's fsGroup, then the cluster's own podSecurityContext."""
    context: dict[str, Any] = dict(RESTRICTED_POD)
    if config.fs_group is not None:
        context |= {"fsGroup": config.fs_group, "fsGroupChangePolicy": "OnRootMismatch"}
    return context | dict(config.jobs.pod_security_context)


def resources(step: str, spec: DoppelUserSpec, config: OperatorConfig) -> dict[str, dict[str, str]]:
    """Container resources. Train: the DoppelUser's (or the train defaults') CPU and memory requests, else
    the cluster's floor; the memory limit equals the request; GPUs as limits."""
    if step in CPU_STEPS:
        return {kind: dict(values) for kind, values in config.jobs.cpu.resources.items()}
    defaults, floor = config.train_defaults.resources, config.jobs.train
    cpu = spec.resources.cpu or defaults.cpu or floor.cpu
    memory = spec.resources.memory or defaults.memory or floor.memory
    out = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if spec.resources.gpu:
        out["limits"]["nvidia.com/gpu"] = str(spec.resources.gpu)
    return out


def env(config: OperatorConfig) -> list[dict[str, Any]]:
    """HOME on the writable /tmp (the root filesystem is read-only), then the cluster's extra variables."""
    return [{"name": "HOME", "value": TMP}, *(dict(item) for item in config.jobs.env)]


def apply(
    pod_spec: dict[str, Any],
    container: dict[str, Any],
    step: str,
    spec: DoppelUserSpec,
    config: OperatorConfig,
) -> None:
    """Fill `pod_spec` and its one `container` with what every Job pod of `step` gets (in place).

    `spec` has the train defaults applied already; a train pod's nodeSelector and tolerations come from it,
    a CPU step's from the cluster's settings."""
    container["securityContext"] = dict(CONTAINER_SECURITY)
    container["resources"] = resources(step, spec, config)
    container["env"] = [*container.get("env", []), *env(config)]
    container["volumeMounts"] = [*container.get("volumeMounts", []), {"name": "tmp", "mountPath": TMP}]
    pod_spec["volumes"] = [*pod_spec.get("volumes", []), {"name": "tmp", "emptyDir": {}}]
    pod_spec["securityContext"] = pod_security_context(config)
    train_priority = config.jobs.train.priority_class_name if step == "train" else ""
    priority = train_priority or config.jobs.priority_class_name
    if priority:
        pod_spec["priorityClassName"] = priority
    if step in CPU_STEPS:
        if config.jobs.cpu.node_selector:
            pod_spec["nodeSelector"] = dict(config.jobs.cpu.node_selector)
        if config.jobs.cpu.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in config.jobs.cpu.tolerations]
