"""`doppel operator dry-run`: every object the operator would create for one DoppelUser, built by the same
functions its reconcile loop uses (jobs.py, podspec.py) with the same configuration, so that an admin can
read what it will run and a policy tool (kubeconform, kyverno, checkov) can check it in CI.

Pure: a DoppelUser manifest and an OperatorConfig in, Kubernetes objects out; no API calls.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from doppel.api import GROUP, KIND, VERSION, DoppelUserSpec
from doppel.errors import BadInput
from doppel.operator import jobs
from doppel.operator.config import OperatorConfig

# What a DoppelUser read from a file lacks until the API server stores it.
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
API_VERSION = f"{GROUP}/{VERSION}"


def planned_objects(manifest: Any, config: OperatorConfig) -> list[dict[str, Any]]:
    """The Jobs of a DoppelUser's whole life, in order: scrape, train, the cleanup of the scraped data after
    training and the purge of its files when it is deleted (each unless spec.retention keeps them); attempt
    1 of each. BadInput for a manifest the operator would refuse."""
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        raise BadInput(f"not a {KIND}: kind is {kind!r}")
    if manifest.get("apiVersion") != API_VERSION:
        raise BadInput(f"apiVersion must be {API_VERSION}, got {manifest.get('apiVersion')!r}")
    meta = manifest.get("metadata") or {}
    if not meta.get("name"):
        raise BadInput("metadata.name is missing")
    try:
        spec = DoppelUserSpec.model_validate(manifest.get("spec") or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise BadInput(f"spec.{'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    if config.max_lora_rank is not None and spec.training.rank > config.max_lora_rank:
        limit = config.max_lora_rank
        raise BadInput(f"spec.training.rank {spec.training.rank} is above vLLM's --max-lora-rank {limit}")
    namespace = meta.get("namespace") or (config.namespaces[0] if config.namespaces else "default")
    uid, generation = meta.get("uid") or PLACEHOLDER_UID, int(meta.get("generation") or 1)
    owner = jobs.Owner(namespace, meta["name"], uid, generation)
    steps: list[tuple[jobs.Step, list[str]]] = [
        ("scrape", jobs.scrape_command(spec, config, owner)),
        ("train", jobs.train_command(spec, config, owner)),
    ]
    if spec.retention.after_training == "Delete":
        steps.append(("cleanup", jobs.cleanup_command(config, [jobs.dataset_dir(config, owner)])))
    if spec.retention.on_deletion == "Delete":
        steps.append(("purge", jobs.cleanup_command(config, [jobs.user_dir(config, namespace, owner.name)])))
    return [jobs.job_manifest(owner, step, 1, command, spec, config) for step, command in steps]
