"""`doppel local`: the whole pipeline on one machine, no cluster, no GPU needed.

Stages, each shown with its number, name and elapsed time: workspace (the demo export, or the given one)
-> base model (the demo: SmolLM2-135M-Instruct, built once into the models cache) -> scrape (incremental)
-> train (skipped when nothing changed) -> eval (the fidelity report, eval.json; see doppel.train.fidelity)
-> replies (the in-process transformers+peft backend answers a few questions, adapter and persona-prompted
base model side by side, in one batch).

Everything goes under one work directory:

    WORKDIR/demo/workspace.zip          the synthetic export (--demo)
    WORKDIR/models/doppel-tiny/         the tiny base model (--base-model doppel-tiny)
    WORKDIR/data/USER/                  samples.jsonl, manifest.json, the scrape's incremental state
    WORKDIR/adapters/USER/FINGERPRINT/  the adapter (+ metrics.json, eval.json, fingerprint.json);
                                        FINGERPRINT hashes samples, base model and training settings, so
                                        a second run with the same inputs reuses it instead of retraining
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from doppel.errors import BadInput
from doppel.train.base_models import check_model_dir, looks_like_path

if TYPE_CHECKING:  # stage modules load when their stage runs (the bot's only for --socket-mode)
    from doppel.bot.config import BotConfig
    from doppel.bot.server import Bot
    from doppel.slack.samples import Manifest

FINGERPRINT_FILE = "fingerprint.json"
# Where the local bot keeps its one doppel, whatever the workspace (there is no cluster to map teams).
LOCAL_NAMESPACE = "local"
ASKER_ID = "U0LOCALASK"
# Questions for a real workspace, where there are no demo people to ask them.
GENERIC_QUESTIONS = (
    "Can you take a look at the failing deploy when you have a minute?",
    "What do you think about moving the team meeting to Thursdays?",
    "Any tips for someone starting on the project next week?",
)
# The demo's training budget per base model. SmolLM2 (the default) trains at ~100-200 tokens/s on 2 cores, so
# the demo affords tens of small steps: a high learning rate makes the most of them, and the adapter kept is
# the best on held-out loss, so the budget cannot overfit it. The tiny random model (mechanical tests) learns
# from scratch and needs many cheap steps.
DEMO_TRAINING: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "rank": 16,
        "alpha": 32,
        "dropout": 0.0,
        "lr": 1e-3,
        "batch_size": 8,
        "grad_accum": 1,
        "max_length": 512,
        "eval_fraction": 0.15,
        "early_stopping_patience": 100,
    },
    "doppel-tiny": {
        "rank": 16,
        "alpha": 32,
        "dropout": 0.0,
        "lr": 3e-3,
        "batch_size": 4,
        "grad_accum": 1,
        "max_length": 512,
        "eval_fraction": 0.15,
        "early_stopping_patience": 100,
    },
}
DEMO_MAX_STEPS = {"smollm2-135m": 16, "doppel-tiny": 240}
DEMO_BASE_MODEL = "smollm2-135m"
# Replies are short: Slack messages, and generation on CPU is not free.
DEFAULT_REPLY_TOKENS = 120


@dataclass(frozen=True)
class Question:
    asker_id: str
    asker_name: str
    text: str


@dataclass(frozen=True)
class Reply:
    question: Question
    adapter: str
    base: str


@dataclass
class Settings:
    """What the user chose on the command line."""

    workdir: Path
    demo: bool = False
    export: Path | None = None
    user: str | None = None
    base_model: str | None = None
    slack_token: str | None = None
    slack_api_url: str | None = None
    # Multiplies Slack's documented rate limits (raised limits, an emulator).
    slack_rate_scale: float = 1.0
    max_steps: int | None = None
    # Scrape only messages this recent (None: ingestion's default); old exports need a larger one.
    cutoff_days: float | None = None
    reply_tokens: int = DEFAULT_REPLY_TOKENS
    scrub: bool = True  # secrets, emails and phone numbers out of the samples

    def check(self) -> None:
        """Reject contradictory or missing options before anything is written."""
        if sum([self.demo, self.export is not None, self.slack_token is not None]) != 1:
            raise BadInput("give exactly one of --demo, --export ZIP or --slack-token TOKEN")
        if not self.demo and not self.user:
            raise BadInput("--user is required with --export or --slack-token")
        if not self.demo and not self.base_model:
            raise BadInput("--base-model is required with --export or --slack-token")
        if self.export is not None and not self.export.is_file():
            raise BadInput(f"export not found: {self.export}")
        if self.base_model and self.base_model not in local_models() and looks_like_path(self.base_model):
            check_model_dir(Path(self.base_model).expanduser())
        if self.max_steps is not None and self.max_steps < 1:
            raise BadInput(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.reply_tokens < 1:
            raise BadInput(f"--max-tokens must be at least 1, got {self.reply_tokens}")
        if self.slack_rate_scale <= 0:
            raise BadInput(f"--slack-rate-scale must be positive, got {self.slack_rate_scale}")
        if self.cutoff_days is not None and self.cutoff_days <= 0:
            raise BadInput(f"--cutoff-days must be positive, got {self.cutoff_days}")


@dataclass
class Outcome:
    """What a run produced; `summary()` is the CLI's result."""

    person_id: str
    person_name: str
    handle: str  # the --user given (demo: margaret); names the doppel in Slack
    samples: int
    added_samples: int
    base_model: Path
    adapter: Path
    trained: bool
    metrics: dict[str, Any]
    replies: list[Reply] = field(default_factory=list)
    fidelity: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "person": self.person_id,
            "samples": self.samples,
            "added_samples": self.added_samples,
            "adapter": str(self.adapter),
            "trained": self.trained,
            "steps": self.metrics.get("steps"),
            "base_eval_loss": self.metrics.get("base_eval_loss"),
            "adapter_eval_loss": self.metrics.get("adapter_eval_loss"),
            "eval": _headline(self.fidelity),
        }


def _headline(report: dict[str, Any]) -> dict[str, Any] | None:
    from doppel.train.fidelity import headline

    return headline(report) if report else None


class Progress:
    """One line per stage on stderr: number and name when it starts, elapsed time and a note when it ends."""

    def __init__(self, total: int, out: TextIO | None = None) -> None:
        self.total = total
        self.out = out or sys.stderr
        self.number = 0

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        """Yields a dict in which the stage may leave a `note` for its closing line."""
        self.number += 1
        info: dict[str, str] = {}
        tag = f"[{self.number}/{self.total}] {name}"
        print(f"{tag} ...", file=self.out, flush=True)
        started = time.monotonic()
        yield info
        note = f": {info['note']}" if info.get("note") else ""
        print(f"{tag} done in {time.monotonic() - started:.1f}s{note}", file=self.out, flush=True)


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def demo_export(self) -> Path:
        return self.root / "demo" / "workspace.zip"

    @property
    def tiny_model(self) -> Path:
        from doppel.train.tiny import TINY_MODEL_NAME

        return self.root / "models" / TINY_MODEL_NAME

    def data(self, user: str) -> Path:
        return self.root / "data" / _slug(user)

    def adapters(self, user: str) -> Path:
        return self.root / "adapters" / _slug(user)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.strip().lstrip("@").casefold()).strip("-.") or "user"


def run_local(settings: Settings, progress: Progress | None = None) -> Outcome:
    """Scrape, train (unless an adapter for the same inputs exists) and answer the questions."""
    settings.check()
    layout = Layout(Path(settings.workdir))
    user = settings.user or _demo_person()
    if settings.demo:
        _check_demo_user(user)
    progress = progress or Progress(6 if settings.slack_token is None else 5)
    # The stage lines are the progress display: transformers' per-file bars (weights loaded, shards
    # written) would only interleave with them. The trainer's own bar is not one of those and stays.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    export: Path | None = None  # None: scrape through the Web API
    if settings.slack_token is None:
        with progress.stage("workspace") as info:
            export = _workspace(settings, layout)
            info["note"] = str(export)
    with progress.stage("base model") as info:
        base_name, base_path = _base_model(settings, layout)
        info["note"] = base_name
    with progress.stage("scrape") as info:
        manifest = _scrape(settings, layout, user, export)
        info["note"] = f"{manifest.samples} samples of {manifest.person['name']} ({manifest.added} new)"
    with progress.stage("train") as info:
        samples = layout.data(user) / "samples.jsonl"
        adapter, metrics, trained = _train(settings, layout, user, samples, base_name, base_path)
        info["note"] = ("trained " if trained else "unchanged, reused ") + str(adapter)
    outcome = Outcome(
        person_id=manifest.person["id"],
        person_name=manifest.person["name"],
        handle=user,
        samples=manifest.samples,
        added_samples=manifest.added,
        base_model=base_path,
        adapter=adapter,
        trained=trained,
        metrics=metrics,
    )
    with progress.stage("eval") as info:
        outcome.fidelity, fresh = _fidelity(outcome, samples)
        info["note"] = ("wrote " if fresh else "unchanged, reused ") + str(adapter / "eval.json")
    with progress.stage("replies") as info:
        outcome.replies = answer(
            outcome, questions(settings.demo, outcome.person_id), settings.reply_tokens, samples
        )
        info["note"] = f"{len(outcome.replies)} questions, adapter and persona-prompted base model"
    return outcome


def _fidelity(outcome: Outcome, samples: Path) -> tuple[dict[str, Any], bool]:
    """The adapter's fidelity report: eval.json if this adapter has one, else computed and written."""
    from doppel.train.fidelity import EVAL_FILE, evaluate_adapter, write_report

    existing = outcome.adapter / EVAL_FILE
    if existing.is_file():
        return json.loads(existing.read_text(encoding="utf-8")), False
    report = evaluate_adapter(outcome.base_model, outcome.adapter, samples, metrics=outcome.metrics)
    write_report(outcome.adapter, report)
    return report, True


def _demo_person() -> str:
    from doppel.demo.workspace import DEMO_PERSON

    return DEMO_PERSON


def _check_demo_user(user: str) -> None:
    """Fail on an unknown demo person before the demo writes anything."""
    from doppel.demo.workspace import build_workspace
    from doppel.slack.samples import resolve_person

    resolve_person(build_workspace()["users.json"], user)


def _workspace(settings: Settings, layout: Layout) -> Path:
    if settings.export is not None:
        return settings.export
    from doppel.demo.workspace import export_bytes, write_export

    # Deterministic: rewrite only when missing or different (another seed or version of the generator).
    export = layout.demo_export
    if not export.is_file() or export.read_bytes() != export_bytes():
        write_export(export)
    return export


def local_models() -> tuple[str, ...]:
    """Base model names `doppel local` knows without a path: the built-in ones and the tiny model."""
    from doppel.train.base_models import BUILTIN_MODELS
    from doppel.train.tiny import TINY_MODEL_NAME

    return (*BUILTIN_MODELS, TINY_MODEL_NAME)


def _base_model(settings: Settings, layout: Layout) -> tuple[str, Path]:
    """The base model's name (as given) and a local directory holding it."""
    from doppel.train.base_models import resolve_base_model
    from doppel.train.tiny import TINY_MODEL_NAME, make_tiny_model

    name = settings.base_model or DEMO_BASE_MODEL
    if name == TINY_MODEL_NAME:
        if not (layout.tiny_model / "config.json").is_file():
            make_tiny_model(layout.tiny_model)
        return TINY_MODEL_NAME, layout.tiny_model
    return name, resolve_base_model(name)


def _scrape(settings: Settings, layout: Layout, user: str, export: Path | None) -> Manifest:
    from doppel.slack.samples import ScrapeOptions

    out = layout.data(user)
    options = ScrapeOptions(scrub=settings.scrub)
    if settings.cutoff_days is not None:
        options.cutoff_days = settings.cutoff_days
    if export is None:
        from doppel.slack.scrape import ApiSettings, scrape_api

        api = ApiSettings(rate_scale=settings.slack_rate_scale)
        if settings.slack_api_url:
            api.base_url = settings.slack_api_url
        assert settings.slack_token is not None
        return scrape_api(settings.slack_token, user, out, options, api)
    from doppel.slack.export import scrape_export

    if settings.demo:
        from doppel.demo.workspace import EXPORTED_AT

        options.now = EXPORTED_AT.timestamp()
    return scrape_export(export, user, out, options)


def training_settings(settings: Settings, n_samples: int, base_name: str) -> dict[str, Any]:
    """TrainConfig fields for this run, besides data, base model and output."""
    from doppel.train.trainer import TrainConfig

    demo = settings.demo and base_name in DEMO_TRAINING
    chosen: dict[str, Any] = dict(DEMO_TRAINING[base_name]) if demo else {}
    steps = settings.max_steps or (DEMO_MAX_STEPS[base_name] if demo else None)
    if steps is not None:
        view = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | chosen
        per_epoch = _steps_per_epoch_at_least(
            n_samples, view["eval_fraction"], view["batch_size"] * view["grad_accum"]
        )
        chosen.update(_epochs_for(steps, per_epoch))
    return chosen


def _steps_per_epoch_at_least(n_samples: int, eval_fraction: float, batch: int) -> int:
    """A safe lower bound on the optimizer steps of one epoch (the thread split holds out a bit more
    than `eval_fraction` of the samples when threads are uneven)."""
    return max(1, int(n_samples * (1 - eval_fraction - 0.1)) // batch)


def _epochs_for(steps: int, per_epoch: int) -> dict[str, int]:
    """`epochs` x `max_steps_per_epoch` == `steps` exactly, with epochs no longer than the data allows:
    the largest divisor of `steps` that fits in one epoch."""
    cap = next(d for d in range(min(steps, per_epoch), 0, -1) if steps % d == 0)
    return {"epochs": steps // cap, "max_steps_per_epoch": cap}


def fingerprint(samples: Path, base_model: Path, train: dict[str, Any]) -> str:
    """A hash of what determines the adapter: the samples, the base model's files and the settings."""
    digest = hashlib.sha256(Path(samples).read_bytes())
    model_files = sorted(
        (p.name, p.stat().st_size) for p in Path(base_model).iterdir() if p.is_file() and p.suffix != ".lock"
    )
    config = (Path(base_model) / "config.json").read_text(encoding="utf-8")
    identity = {"model_files": model_files, "model_config": config, "train": train}
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _train(
    settings: Settings, layout: Layout, user: str, samples: Path, base_name: str, base_path: Path
) -> tuple[Path, dict[str, Any], bool]:
    n_samples = sum(1 for line in samples.read_text(encoding="utf-8").splitlines() if line.strip())
    train = training_settings(settings, n_samples, base_name)
    adapters = layout.adapters(user)
    adapter = adapters / fingerprint(samples, base_path, {"base_model_name": base_name, **train})
    metrics_file = adapter / "metrics.json"
    # train_adapter writes the directory atomically: if it exists, it is complete.
    if (adapter / "adapter_config.json").is_file() and metrics_file.is_file():
        return adapter, json.loads(metrics_file.read_text(encoding="utf-8")), False

    from doppel.fsutil import atomic_write_text
    from doppel.train.trainer import TrainConfig, train_adapter

    config = TrainConfig(
        data=samples, base_model=str(base_path), base_model_name=base_name, out=adapter, **train
    )
    metrics = train_adapter(config).to_dict()
    record = {"base_model": base_name, "samples_sha256": _sha256(samples), "train": train}
    atomic_write_text(adapter / FINGERPRINT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    # Only the newest adapter of a person is served locally; older versions are just disk.
    for old in adapters.iterdir():
        if old.is_dir() and old != adapter and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return adapter, metrics, True


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def questions(demo: bool, person_id: str) -> list[Question]:
    if demo:
        from doppel.demo.workspace import demo_questions

        return [Question(p.id, p.first_name, text) for p, text in demo_questions(person_id)]
    return [Question(ASKER_ID, "Alex", text) for text in GENERIC_QUESTIONS]


def answer(
    outcome: Outcome,
    asked: Sequence[Question],
    max_tokens: int = DEFAULT_REPLY_TOKENS,
    samples: Path | None = None,
) -> list[Reply]:
    """Each question answered by the adapter and by the persona-prompted base model (the same base, told
    whom to be and shown a few of the person's messages from `samples`), all in one generation batch."""
    from doppel.serve.backend import BASE_ADAPTER, GenerationParams
    from doppel.serve.local import LocalBackend
    from doppel.slack.conversation import ThreadMessage, build_conversation
    from doppel.train.data import load_samples
    from doppel.train.fidelity import persona_examples, persona_prompt, with_system

    name = _slug(outcome.person_id)
    backend = LocalBackend(outcome.base_model, {name: outcome.adapter})
    persona = persona_prompt(outcome.person_name, persona_examples(load_samples(samples)) if samples else [])
    conversations = [
        build_conversation(
            outcome.person_name,
            outcome.person_id,
            [ThreadMessage(q.asker_id, q.asker_name, q.text)],
            channel="general",
        )
        for q in asked
    ]
    requests = [
        (r, c if r == name else with_system(c, persona)) for c in conversations for r in (name, BASE_ADAPTER)
    ]
    texts = backend.complete_batch(requests, GenerationParams(max_tokens=max_tokens, seed=0))
    return [Reply(q, texts[2 * i].strip(), texts[2 * i + 1].strip()) for i, q in enumerate(asked)]


def socket_mode_config(slack_token: str | None, env: Mapping[str, str] | None = None) -> BotConfig:
    """The bot's settings for --socket-mode, from the environment as `doppel bot` reads them (the bot token
    defaults to --slack-token); checked before any work is done."""
    from doppel.bot.config import BotConfig

    values = dict(os.environ if env is None else env)
    if slack_token and not values.get("SLACK_BOT_TOKEN"):
        values["SLACK_BOT_TOKEN"] = slack_token
    config = BotConfig.from_env(values)
    if config.oauth:
        raise BadInput("--socket-mode serves one workspace: set SLACK_BOT_TOKEN (or pass --slack-token)")
    if not config.app_token:
        raise BadInput("--socket-mode needs SLACK_APP_TOKEN (an app-level xapp- token)")
    # One machine, one doppel: whichever workspace the token belongs to finds it in the same place.
    return dataclasses.replace(config, team_namespaces={}, namespace_template=LOCAL_NAMESPACE)


def local_bot(outcome: Outcome, config: BotConfig) -> Bot:
    """The Slack bot answering mentions with this run's adapter, in this process: no cluster, no vLLM."""
    from doppel.bot.app import backend_chat
    from doppel.bot.directory import MemoryDirectory
    from doppel.bot.logic import object_name
    from doppel.bot.server import create_bot
    from doppel.serve.backend import DEFAULT_PARAMS
    from doppel.serve.local import LocalBackend

    served = _slug(outcome.person_id)
    backend = LocalBackend(outcome.base_model, {served: outcome.adapter})
    directory = MemoryDirectory()
    # The DoppelUser the operator would have made Ready, reduced to what the bot reads.
    directory.add(
        {
            "apiVersion": "doppel.dev/v1alpha1",
            "kind": "DoppelUser",
            "metadata": {"name": object_name(outcome.handle), "namespace": config.namespace_for("")},
            "spec": {"target": {"userId": outcome.person_id, "realName": outcome.person_name}},
            "status": {
                "phase": "Ready",
                "samples": outcome.samples,
                "adapter": {"servedName": served, "path": str(outcome.adapter), "version": 1},
            },
        }
    )
    chat = backend_chat(backend, DEFAULT_PARAMS.override(max_tokens=config.max_tokens))
    return create_bot(config, chat=chat, kube=directory)


def report(outcome: Outcome, width: int = 100) -> str:
    """The replies side by side (adapter left, persona-prompted base model right), then the fidelity table."""
    column = (width - 3) // 2
    lines = [
        f"doppel of {outcome.person_name} ({outcome.person_id}): {outcome.samples} samples, "
        f"adapter {outcome.adapter}",
        "",
    ]
    for reply in outcome.replies:
        lines.append(f"{reply.question.asker_name}: {reply.question.text}")
        lines.append(
            f"{f'adapter ({outcome.person_name})':<{column}} | base model, persona prompt (no adapter)"
        )
        lines.append(f"{'-' * column}-+-{'-' * column}")
        for left, right in itertools.zip_longest(
            _wrap(reply.adapter, column), _wrap(reply.base, column), fillvalue=""
        ):
            lines.append(f"{left:<{column}} | {right}".rstrip())
        lines.append("")
    lines.append(loss_line(outcome.metrics))
    if outcome.fidelity:
        from doppel.train.fidelity import table

        lines.append(table(outcome.fidelity))
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    wrapped: list[str] = []
    for paragraph in (text.strip() or "(empty reply)").splitlines():
        wrapped += textwrap.wrap(paragraph, width) or [""]
    return wrapped


def loss_line(metrics: dict[str, Any]) -> str:
    base, tuned = metrics.get("base_eval_loss"), metrics.get("adapter_eval_loss")
    if base is None or tuned is None:
        return "held-out loss: not measured (too few threads to hold any out)"
    change = (tuned - base) / base * 100 if base else 0.0
    return (
        f"held-out loss on unseen threads ({metrics.get('eval_samples', '?')} samples): "
        f"base model {base:.3f} -> adapter {tuned:.3f} ({change:+.0f}%), "
        f"after {metrics.get('steps', '?')} steps"
    )
