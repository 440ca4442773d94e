"""Operator configuration: what differs between clusters (and between a cluster and the tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from doppel.api import TrainDefaults

# Pod Security "restricted" for every Job pod: the worker images' non-root user, the runtime's default
# seccomp profile. A cluster's own podSecurityContext (JobPods) is merged over it.
RESTRICTED_POD: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}


class _Settings(BaseModel):
    """camelCase like the chart's values; an unknown key is an error, not silently ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class CpuJobPods(_Settings):
    """Scrape and cleanup pods: small, CPU only, on any node."""

    # Quota namespaces refuse pods without requests; the memory limit keeps a runaway scrape in check.
    resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class TrainJobPods(_Settings):
    # "" takes JobPods.priority_class_name.
    priority_class_name: str = ""
    # Requests of train pods whose DoppelUser and the train defaults name none (Burstable, never BestEffort).
    cpu: str = "1"
    memory: str = "8Gi"


class JobPods(_Settings):
    """What every Job pod gets from the cluster (the chart's `jobs` values, as JSON in DOPPEL_JOBS)."""

    # Image of the scrape and cleanup Jobs (no torch); None runs them in the train worker image.
    cpu_image: str | None = None
    # Finished Jobs (and their pods) are deleted this long after they end; None keeps them.
    ttl_seconds_after_finished: int | None = Field(default=3600, ge=0)
    pod_security_context: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str = ""
    # More environment of every Job container (proxies, site settings), as Kubernetes EnvVar objects.
    env: list[dict[str, Any]] = Field(default_factory=list)
    cpu: CpuJobPods = Field(default_factory=CpuJobPods)
    train: TrainJobPods = Field(default_factory=TrainJobPods)


@dataclass(frozen=True)
class OperatorConfig:
    # Mount path of the shared volume, identical in worker and vLLM pods: adapter paths written into
    # status are paths under it, and vLLM loads them from there.
    data_root: str = "/data"
    # PersistentVolumeClaim mounted at data_root in the Jobs; None mounts nothing (tests run Jobs locally).
    data_claim: str | None = "doppel-data"
    worker_image: str = "ghcr.io/doppel/worker:latest"
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    # Resources, nodeSelector and tolerations of train Jobs whose DoppelUser leaves them out.
    train_defaults: TrainDefaults = field(default_factory=TrainDefaults)
    # GPUs are scarce: at most this many train Jobs run at once, cluster-wide; the rest queue FIFO.
    max_trainings: int = 1
    # Slack Web API base URL override (an emulator, a proxy); None uses slack.com.
    slack_api_url: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    # Transient Job failures are retried this many times in all, with exponential backoff.
    max_attempts: int = 4
    backoff_s: float = 10.0
    max_backoff_s: float = 300.0
    # How often each object re-checks its vLLM pods' /v1/models and everything else (drift repair).
    resync_s: float = 30.0
    # While a train Job runs, its pod's log is read this often for step-by-step progress in the status.
    progress_s: float = 10.0
    # Extra CLI flags for the scrape and train Jobs (tests raise rate limits, keep training short).
    scrape_args: tuple[str, ...] = field(default_factory=tuple)
    train_args: tuple[str, ...] = field(default_factory=tuple)
    # A Job whose pod stays Pending this long for a reason that needs a person (Unschedulable,
    # ImagePullBackOff...) is stopped and counted as a failed attempt: it frees its training slot.
    pending_timeout_s: float = 600.0
    # activeDeadlineSeconds of each step's Jobs: a hung Job fails instead of holding its slot forever.
    deadlines_s: dict[str, int] = field(
        default_factory=lambda: {
            "scrape": 3600,
            "train": 6 * 3600,
            "cleanup": 600,
            "purge": 600,
            "prune": 600,
        }
    )
    # vLLM's --max-lora-rank: a higher spec.training.rank is refused before training; None: not checked.
    max_lora_rank: int | None = None
    # Adapter versions kept on the volume below the served one (older ones and failed runs' leftovers go).
    keep_adapters: int = 1
    # vLLM's filesystem LoRA resolver directory (VLLM_LORA_RESOLVER_CACHE_DIR, under data_root): each
    # trained adapter gets a symlink there named as it is served, so a vLLM pod that restarts serves it on
    # first use, before the operator has loaded anything. None: no links.
    lora_dir: str | None = None
    # What Job pods need on a real cluster (the chart sets them).
    image_pull_secrets: tuple[str, ...] = ()
    hf_home: str | None = None  # Hugging Face cache on the shared volume: a model downloads once
    hf_token_secret: str | None = None  # Secret with key HF_TOKEN (gated models)
    fs_group: int | None = None  # lets the non-root worker write the shared volume
    # Security context, resources, priority, scheduling, environment and clean-up of the Job pods.
    jobs: JobPods = field(default_factory=JobPods)
    # Labels of the vLLM pods of DoppelUsers that name none (spec.vllm.selector): the chart's release.
    vllm_selector: dict[str, str] | None = None
    # kopf's liveness endpoint (e.g. http://0.0.0.0:8081/healthz) for the pod's liveness probe; None: off.
    liveness_endpoint: str | None = None
    gpu_runtime_class: str | None = None  # runtimeClassName of train pods that ask for a GPU
    # Kubernetes API server override (tests point it at the emulator); None logs in from the
    # service account or kubeconfig.
    api_server: str | None = None
    # Prometheus /metrics on this port (0: metrics off, nothing served, no instrumentation).
    metrics_port: int = 0
    # kopf peering object shared by replicas ("" or None: standalone, a single operator).
    peering: str | None = None
    # How long a replica's peering record stays valid without a refresh: how soon a standby takes over.
    peering_lifetime_s: int = 60
    # This replica's name in the peering object; None: kopf's own ($POD_ID, else user@host/time/random).
    peer_id: str | None = None
