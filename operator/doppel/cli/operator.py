"""`doppel operator`: the DoppelUser operator's settings (flags and their DOPPEL_* variables), checked and
handed to kopf."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from doppel.cli.common import run_stage
from doppel.errors import BadInput

if TYPE_CHECKING:
    from doppel.operator.config import OperatorConfig


@click.group("operator", invoke_without_command=True)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    envvar="DOPPEL_NAMESPACES",
    help="Watch only these namespaces (repeatable; default: all).",
)
@click.option(
    "--data-root",
    envvar="DOPPEL_DATA_ROOT",
    default="/data",
    show_default=True,
    help="Mount path of the shared volume, the same in worker and vLLM pods.",
)
@click.option(
    "--data-claim",
    envvar="DOPPEL_DATA_CLAIM",
    default="doppel-data",
    show_default=True,
    help="PersistentVolumeClaim mounted there in the Jobs ('' for none).",
)
@click.option(
    "--worker-image", envvar="DOPPEL_WORKER_IMAGE", default="ghcr.io/doppel/worker:latest", show_default=True
)
@click.option(
    "--service-account",
    envvar="DOPPEL_JOB_SERVICE_ACCOUNT",
    default=None,
    help="Service account of the Job pods.",
)
@click.option(
    "--max-trainings",
    envvar="DOPPEL_MAX_TRAININGS",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train Jobs running at once, cluster-wide; the rest queue FIFO.",
)
@click.option(
    "--slack-api-url",
    envvar="DOPPEL_SLACK_API_URL",
    default=None,
    help="Slack Web API base URL override for the scrape Jobs.",
)
@click.option(
    "--resync",
    envvar="DOPPEL_RESYNC_SECONDS",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds between drift checks of each object's vLLM pods.",
)
@click.option(
    "--progress-interval",
    envvar="DOPPEL_PROGRESS_SECONDS",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between reads of a running train pod's log for progress in the status.",
)
@click.option(
    "--train-defaults",
    envvar="DOPPEL_TRAIN_DEFAULTS",
    default=None,
    help='JSON {"resources": ..., "nodeSelector": ..., "tolerations": [...]} for train Jobs of DoppelUsers '
    "that leave those fields out.",
)
@click.option(
    "--pending-timeout",
    envvar="DOPPEL_PENDING_TIMEOUT_SECONDS",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds a Job's pod may stay Pending (Unschedulable, ImagePullBackOff...) before it fails.",
)
@click.option(
    "--scrape-deadline",
    envvar="DOPPEL_SCRAPE_DEADLINE_SECONDS",
    type=click.IntRange(min=1),
    default=3600,
    show_default=True,
    help="activeDeadlineSeconds of scrape Jobs.",
)
@click.option(
    "--train-deadline",
    envvar="DOPPEL_TRAIN_DEADLINE_SECONDS",
    type=click.IntRange(min=1),
    default=6 * 3600,
    show_default=True,
    help="activeDeadlineSeconds of train Jobs.",
)
@click.option(
    "--max-lora-rank",
    envvar="DOPPEL_MAX_LORA_RANK",
    type=click.IntRange(min=1),
    default=None,
    help="vLLM's --max-lora-rank: a higher spec.training.rank is refused before training.",
)
@click.option(
    "--keep-adapters",
    envvar="DOPPEL_KEEP_ADAPTERS",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Adapter versions kept below the served one; older ones are removed from the volume.",
)
@click.option(
    "--image-pull-secrets",
    envvar="DOPPEL_IMAGE_PULL_SECRETS",
    default="",
    help="Comma-separated imagePullSecrets of the Job pods.",
)
@click.option(
    "--lora-dir",
    envvar="DOPPEL_LORA_DIR",
    default=None,
    help="vLLM's filesystem LoRA resolver directory (under --data-root): adapters are linked there by name.",
)
@click.option(
    "--hf-home", envvar="DOPPEL_HF_HOME", default=None, help="HF_HOME of train pods (shared volume)."
)
@click.option(
    "--hf-token-secret", envvar="DOPPEL_HF_TOKEN_SECRET", default=None, help="Secret with key HF_TOKEN."
)
@click.option("--fs-group", envvar="DOPPEL_FS_GROUP", type=int, default=None, help="fsGroup of the Job pods.")
@click.option(
    "--gpu-runtime-class",
    envvar="DOPPEL_GPU_RUNTIME_CLASS",
    default=None,
    help="runtimeClassName of train pods that ask for a GPU (e.g. nvidia).",
)
@click.option(
    "--api-server",
    envvar="DOPPEL_API_SERVER",
    default=None,
    help="Kubernetes API URL without TLS verification (development); default: in-cluster/kubeconfig.",
)
@click.option(
    "--metrics-port",
    envvar="DOPPEL_METRICS_PORT",
    type=click.IntRange(0, 65535),
    default=9090,
    show_default=True,
    help="Serve Prometheus /metrics on this port (0: metrics off).",
)
@click.option(
    "--peering",
    envvar="DOPPEL_PEERING",
    default="",
    help="kopf peering object shared with other replicas (only one acts); '' runs standalone.",
)
@click.option("--peer-id", envvar="DOPPEL_PEER_ID", default=None, help="This replica's name in the peering.")
@click.option(
    "--jobs",
    "jobs_json",
    envvar="DOPPEL_JOBS",
    default=None,
    help='JSON settings of the Job pods: {"cpuImage", "ttlSecondsAfterFinished", "podSecurityContext", '
    '"priorityClassName", "env", "cpu": {"resources", "nodeSelector", "tolerations"}, "train": {...}}.',
)
@click.option(
    "--vllm-selector",
    envvar="DOPPEL_VLLM_SELECTOR",
    default=None,
    help="JSON labels of the vLLM pods of DoppelUsers whose spec.vllm.selector is unset (the release's).",
)
@click.option(
    "--liveness",
    envvar="DOPPEL_LIVENESS",
    default=None,
    help="kopf's health endpoint for a liveness probe, e.g. http://0.0.0.0:8081/healthz.",
)
@click.pass_context
@run_stage
def operator_command(ctx: click.Context, **params: Any) -> dict[str, Any]:
    """Run the DoppelUser operator (kopf) until interrupted.

    With a subcommand (dry-run), its settings are only read, for the subcommand."""
    import asyncio

    from doppel.operator.handlers import run

    if ctx.invoked_subcommand is not None:
        return {}
    asyncio.run(run(operator_config(**params)))
    return {}


@operator_command.command("dry-run")
@click.option(
    "-f",
    "--filename",
    "source",
    required=True,
    type=click.File("r", encoding="utf-8"),
    help="A DoppelUser manifest (YAML); - reads standard input.",
)
@click.pass_context
@run_stage
def dry_run(ctx: click.Context, source: Any) -> None:
    """Print, as YAML, every object the operator would create for a DoppelUser, with the operator's
    settings from the same flags and DOPPEL_* variables (`doppel operator [flags] dry-run -f x.yaml`)."""
    import yaml

    from doppel.operator.dryrun import planned_objects

    try:
        manifest = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise BadInput(f"{source.name}: not YAML ({str(exc).splitlines()[0]})") from None
    assert ctx.parent is not None
    objects = planned_objects(manifest, operator_config(**ctx.parent.params))
    click.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)


def operator_config(
    *,
    namespaces: tuple[str, ...],
    data_root: str,
    data_claim: str,
    worker_image: str,
    service_account: str | None,
    max_trainings: int,
    slack_api_url: str | None,
    resync: float,
    progress_interval: float,
    train_defaults: str | None,
    pending_timeout: float,
    scrape_deadline: int,
    train_deadline: int,
    max_lora_rank: int | None,
    keep_adapters: int,
    image_pull_secrets: str,
    lora_dir: str | None,
    hf_home: str | None,
    hf_token_secret: str | None,
    fs_group: int | None,
    gpu_runtime_class: str | None,
    api_server: str | None,
    metrics_port: int,
    peering: str,
    peer_id: str | None,
    jobs_json: str | None,
    vllm_selector: str | None,
    liveness: str | None,
) -> OperatorConfig:
    """The operator's configuration from `doppel operator`'s parameters (its options and their environment
    variables, as the chart sets them); BadInput for a wrong value."""
    import pydantic

    from doppel.api import TrainDefaults
    from doppel.operator.config import JobPods, OperatorConfig

    if not data_root.startswith("/"):
        raise BadInput(f"--data-root must be an absolute path, got {data_root!r}")
    try:
        defaults = TrainDefaults.model_validate_json(train_defaults or "{}")
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the value"
        raise BadInput(f"--train-defaults: {where}: {error['msg']}") from None
    try:
        jobs = JobPods.model_validate_json(jobs_json or "{}")
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the value"
        raise BadInput(f"--jobs: {where}: {error['msg']}") from None
    selector = _json_labels(vllm_selector, "--vllm-selector") if vllm_selector else None
    if lora_dir and not lora_dir.startswith(data_root.rstrip("/") + "/"):
        raise BadInput(f"--lora-dir must be inside --data-root {data_root}, got {lora_dir!r}")
    return OperatorConfig(
        data_root=data_root,
        data_claim=data_claim or None,
        worker_image=worker_image,
        service_account=service_account,
        max_trainings=max_trainings,
        slack_api_url=slack_api_url,
        namespaces=tuple(n for ns in namespaces for n in ns.split(",") if n),
        resync_s=resync,
        progress_s=progress_interval,
        train_defaults=defaults,
        pending_timeout_s=pending_timeout,
        deadlines_s={
            "scrape": scrape_deadline,
            "train": train_deadline,
            "cleanup": 600,
            "purge": 600,
            "prune": 600,
        },
        max_lora_rank=max_lora_rank,
        keep_adapters=keep_adapters,
        image_pull_secrets=tuple(n for n in image_pull_secrets.split(",") if n),
        lora_dir=lora_dir or None,
        hf_home=hf_home or None,
        hf_token_secret=hf_token_secret or None,
        fs_group=fs_group,
        gpu_runtime_class=gpu_runtime_class or None,
        api_server=api_server,
        metrics_port=metrics_port,
        peering=peering or None,
        peer_id=peer_id or None,
        jobs=jobs,
        vllm_selector=selector,
        liveness_endpoint=liveness or None,
    )


def _json_labels(text: str, option: str) -> dict[str, str]:
    """A JSON object of label keys and string values, or BadInput naming `option`."""
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{option}: not JSON ({exc.msg})") from None
    if not isinstance(labels, dict) or not labels or not all(isinstance(v, str) for v in labels.values()):
        raise BadInput(f"{option}: must be a non-empty JSON object of label names to string values")
    return labels
