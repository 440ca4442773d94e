"""The adapters on the vLLM pods: which ready pods serve a DoppelUser, loading its adapter on every one of
them (registration of a new version, drift repair of the current one) and unloading old ones.

The decisions (switch or not, what the status says) are promotion.py's; this module does the HTTP calls,
through `PodModels` (podmodels.py): what each pod serves is listed once per interval for all DoppelUsers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from doppel.api import Adapter, DoppelUserSpec, DoppelUserStatus
from doppel.operator.metrics import OperatorMetrics
from doppel.operator.podmodels import PodModels
from doppel.operator.promotion import observe_serving, promote
from doppel.serve.errors import ServeError


def matches(selector: Mapping[str, str], labels: Any) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_url(pod: dict[str, Any], default_port: int) -> str:
    """The base URL of a pod's vLLM API: its `http` port, else its first, else `default_port`."""
    ports = [p for c in pod.get("spec", {}).get("containers", []) for p in c.get("ports") or []]
    port = next((p["containerPort"] for p in ports if p.get("name") == "http"), None)
    port = port or (ports[0]["containerPort"] if ports else default_port)
    return f"http://{pod['status']['podIP']}:{port}"


def vllm_pods(spec: DoppelUserSpec, ready: list[dict[str, Any]]) -> dict[str, str]:
    """The vLLM pods of this object among the `ready` pods of its namespace: pod name -> base URL."""
    return {
        pod["metadata"]["name"]: pod_url(pod, spec.vllm.port)
        for pod in ready
        if matches(spec.vllm.selector, pod.get("metadata", {}).get("labels") or {})
    }


def pool_asleep(spec: DoppelUserSpec, pool: list[Mapping[str, str]], lora_dir: str | None) -> bool:
    """Whether the object's vLLM pool is scaled to zero: no pod matching its selector exists at all (a
    Deployment of one or more replicas always has a pod, ready or not, while its scaler may take it to
    none), and vLLM's filesystem resolver can load an adapter by name from `lora_dir` when one starts.
    `pool` holds the labels of every pod of the namespace that is not a Job's."""
    return lora_dir is not None and not any(matches(spec.vllm.selector, labels) for labels in pool)


async def ensure_loaded(
    models: PodModels, adapter: Adapter, pods: dict[str, str], loaded_now: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Load `adapter` on every pod that lacks it (as its listing says): (pods holding it, errors). Pods it
    had to be loaded on are added to `loaded_now`."""

    async def one(pod: str, url: str) -> str | None:
        try:
            if adapter.served_name in await models.served(url):
                return None
            await models.client(url).load_adapter(adapter.served_name, adapter.path)
        except ServeError as exc:
            return str(exc)
        models.loaded(url, adapter.served_name)
        if loaded_now is not None:
            loaded_now.append(pod)
        return None

    results = await asyncio.gather(*(one(pod, url) for pod, url in pods.items()))
    errors = {pod: err for pod, err in zip(pods, results, strict=True) if err}
    return [pod for pod in pods if pod not in errors], errors


async def unload(
    models: PodModels, adapter: Adapter, pods: dict[str, str], logger: logging.Logger | Any
) -> None:
    async def one(pod: str, url: str) -> None:
        try:
            await models.client(url).unload_adapter(adapter.served_name, missing_ok=True)
        except ServeError as exc:
            logger.warning(f"unloading {adapter.served_name} from {pod}: {exc}")
            return
        models.unloaded(url, adapter.served_name)

    await asyncio.gather(*(one(pod, url) for pod, url in pods.items()))


async def register(
    models: PodModels,
    status: DoppelUserStatus,
    pods: dict[str, str],
    metrics: OperatorMetrics,
    now: datetime,
    asleep: bool = False,
) -> tuple[DoppelUserStatus, Adapter | None]:
    """Load `status.pending_adapter` on every pod, then `promote`: the new status and the old adapter to
    unload once that status is published. `asleep`: the pool has no pod at all (`pool_asleep`)."""
    assert status.pending_adapter is not None
    started = time.monotonic()
    loaded, errors = await ensure_loaded(models, status.pending_adapter, pods)
    metrics.registered(started, loaded, errors)
    return promote(status, loaded, errors, now, asleep=asleep)


async def repair_drift(
    models: PodModels,
    status: DoppelUserStatus,
    pods: dict[str, str],
    metrics: OperatorMetrics,
    meta: Any,
    now: datetime,
    asleep: bool = False,
) -> DoppelUserStatus:
    """Every ready pod must hold the current adapter (a restarted pod loses runtime-loaded ones): load it
    where missing and record which pods serve it."""
    assert status.adapter is not None
    repaired: list[str] = []
    loaded, errors = await ensure_loaded(models, status.adapter, pods, repaired)
    metrics.drift(meta, repaired, errors)
    return observe_serving(status, loaded, errors, now, asleep=asleep)
