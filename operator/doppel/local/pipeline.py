"""The stages of `doppel local`, run in order with one progress line each: workspace, base model, scrape,
train (skipped when an adapter for the same inputs exists), eval, replies."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppel.errors import BadInput
from doppel.local.outcome import Outcome, Question, Reply
from doppel.local.serving import serving_adapter
from doppel.local.settings import (
    DEMO_BASE_MODEL,
    FINGERPRINT_FILE,
    LOCAL_MAX_SAMPLES,
    Layout,
    Settings,
    fingerprint,
    slug,
    training_settings,
)

if TYPE_CHECKING:  # stage modules load when their stage runs
    from doppel.slack.samples import Manifest

ASKER_ID = "U0LOCALASK"
# The cutoff that takes all of an export (a century), when its default left the person too few samples.
WHOLE_EXPORT_DAYS = 36500.0
# Questions for a real workspace when it has no held-out replies to ask again.
GENERIC_QUESTIONS = (
    "Can you take a look at the failing deploy when you have a minute?",
    "What do you think about moving the team meeting to Thursdays?",
    "Any tips for someone starting on the project next week?",
)
HELDOUT_QUESTIONS = 3


class Progress:
    """One line per stage on stderr: number and name when it starts, elapsed time and a note when it ends."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.number = 0

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        """Yields a dict in which the stage may leave a `note` for its closing line."""
        self.number += 1
        info: dict[str, str] = {}
        tag = f"[{self.number}/{self.total}] {name}"
        print(f"{tag} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        yield info
        note = f": {info['note']}" if info.get("note") else ""
        print(f"{tag} done in {time.monotonic() - started:.1f}s{note}", file=sys.stderr, flush=True)


def run_local(settings: Settings) -> Outcome:
    """Scrape, train (unless an adapter for the same inputs exists) and answer the questions."""
    settings.check()
    layout = Layout(Path(settings.workdir))
    user = settings.user or _demo_person()
    if settings.demo:
        _check_demo_user(user)
    progress = Progress(6 if settings.slack_token is None else 5)
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
        info["note"] = _scrape_note(settings, manifest)
    previous = serving_adapter(layout.adapters(user))
    with progress.stage("train") as info:
        samples = layout.data(user) / "samples.jsonl"
        adapter, metrics, trained = _train(settings, layout, user, samples, base_name, base_path)
        info["note"] = ("trained " if trained else "unchanged, reused ") + str(adapter) + _used(metrics)
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
        data_dir=layout.data(user),
    )
    with progress.stage("eval") as info:
        outcome.fidelity, fresh = _fidelity(outcome, samples)
        info["note"] = ("wrote " if fresh else "unchanged, reused ") + str(adapter / "eval.json")
        _gate(outcome, previous, samples, settings.force_promotion, layout.adapters(user))
        if outcome.gate is not None and not outcome.gate.promoted:
            info["note"] += f"; not promoted, still serving {outcome.adapter}"
    with progress.stage("replies") as info:
        if settings.demo:
            outcome.replies = answer(
                outcome, questions(True, outcome.person_id), settings.reply_tokens, samples
            )
        else:
            outcome.replies = answer_heldout(outcome, settings.reply_tokens, samples)
        asked = "questions" if settings.demo else "held-out messages of the workspace, with the real reply"
        info["note"] = f"{len(outcome.replies)} {asked}, adapter and persona-prompted base model"
    return outcome


def _fidelity(outcome: Outcome, samples: Path) -> tuple[dict[str, Any], bool]:
    """The adapter's fidelity report: eval.json if this adapter has one, else computed and written."""
    from doppel.train.fidelity import EVAL_FILE, evaluate_adapter, write_report

    existing = outcome.adapter / EVAL_FILE
    if existing.is_file():
        return json.loads(existing.read_text(encoding="utf-8")), False
    trained_on = _trained_on(samples)
    report = evaluate_adapter(outcome.base_model, outcome.adapter, trained_on, metrics=outcome.metrics)
    if (outcome.adapter / "memory").is_dir():  # with the person's memory: its figures too
        from doppel.train.memory_eval import REPORT_KEY, memory_figures

        config = outcome.metrics.get("config") or {}
        report[REPORT_KEY] = memory_figures(outcome.base_model, outcome.adapter, trained_on, config)
    write_report(outcome.adapter, report)
    return report, True


def _gate(outcome: Outcome, previous: Path | None, samples: Path, force: bool, adapters: Path) -> None:
    """The fidelity gate (`doppel.local.serving`): a new adapter is served only when it is not worse than
    the one serving before it on the same held-out replies, or when forced. When it is refused, the outcome
    becomes the serving adapter's: its metrics, and its report on the new held-out set."""
    from doppel.local.serving import comparable, decide, serve, serving_report

    if previous is not None and not comparable(previous, outcome.adapter):
        previous = None  # another base model: nothing to weigh the new adapter against
    old_report = None
    if previous is not None and previous != outcome.adapter:
        trained_on = _trained_on(samples)
        old_report = serving_report(
            outcome.base_model, previous, outcome.adapter, trained_on, outcome.fidelity
        )
    decision = decide(outcome.adapter, previous, outcome.fidelity, old_report, force)
    serve(adapters, decision)
    outcome.gate = decision
    if not decision.promoted and old_report is not None:
        outcome.adapter = decision.served
        outcome.metrics = json.loads((decision.served / "metrics.json").read_text(encoding="utf-8"))
        outcome.fidelity = old_report


def _trained_on(samples: Path) -> Path:
    """What the adapters were trained on (their memory in the prompts, their corrections): evaluated in the
    shape they were trained in and are served in, as `doppel train` does."""
    from doppel.train.stage import REMEMBERED_FILE

    remembered = samples.with_name(REMEMBERED_FILE)
    return remembered if remembered.is_file() else samples


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


def _base_model(settings: Settings, layout: Layout) -> tuple[str, Path]:
    """The base model's name and a local directory holding it: a directory built from a built-in model
    (`doppel base-model` prints it) is named as that model, so that its CPU budget applies."""
    from doppel.train.base_models import builtin_of, resolve_base_model
    from doppel.train.tiny import TINY_MODEL_NAME, make_tiny_model

    name = settings.base_model or DEMO_BASE_MODEL
    if name == TINY_MODEL_NAME:
        if not (layout.tiny_model / "config.json").is_file():
            make_tiny_model(layout.tiny_model)
        return TINY_MODEL_NAME, layout.tiny_model
    path = resolve_base_model(name)
    builtin = builtin_of(path)
    return (builtin.name if builtin else name), path


def _scrape(settings: Settings, layout: Layout, user: str, export: Path | None) -> Manifest:
    from doppel.slack.samples import ScrapeOptions

    out = layout.data(user)
    options = ScrapeOptions(scrub=settings.scrub, max_samples=LOCAL_MAX_SAMPLES)
    if settings.cutoff_days is not None:
        options.cutoff_days = settings.cutoff_days
    if settings.min_length is not None:
        options.min_length = settings.min_length
    if export is None:
        from doppel.slack.scrape import ApiSettings, scrape_api

        api = ApiSettings(rate_scale=settings.slack_rate_scale)
        if settings.slack_api_url:
            api.base_url = settings.slack_api_url
        assert settings.slack_token is not None
        return _enough(scrape_api(settings.slack_token, user, out, options, api))
    from doppel.slack.export import scrape_export

    if settings.demo:
        from doppel.demo.workspace import EXPORTED_AT

        options.now = EXPORTED_AT.timestamp()
    from doppel.slack.samples import NoSamples

    if settings.cutoff_days is None and _reached_back(out):
        options.cutoff_days = WHOLE_EXPORT_DAYS  # as the first run chose, or this run would narrow it again
    try:
        manifest = scrape_export(export, user, out, options)
    except NoSamples as exc:
        if not _reach_back(settings, exc.manifest, out):
            raise
        manifest = exc.manifest
    if _reach_back(settings, manifest, out):
        # An export is a snapshot: someone who wrote too little in their last year is learnt from further
        # back (the newest samples still first) rather than refused. Merged into the first run's output.
        options.cutoff_days = WHOLE_EXPORT_DAYS
        added = manifest.added
        manifest = scrape_export(export, user, out, options)
        manifest.added += added  # new to this run: the first scrape's too
    return _enough(manifest)


def _reach_back(settings: Settings, manifest: Manifest, out: Path) -> bool:
    """Whether an export's scrape at the default cutoff left too few samples to train on, once the
    training has held out its share, and older messages, left out by the cutoff, may make up for it (never
    when the user chose the cutoff)."""
    from doppel.slack.samples import SAMPLES_FILE
    from doppel.train import data
    from doppel.train.trainer import TrainConfig

    if settings.cutoff_days is not None or settings.demo or not manifest.person_messages.get("before_cutoff"):
        return False
    if not (out / SAMPLES_FILE).is_file():
        return True
    samples = data.load_samples(out / SAMPLES_FILE)
    return len(data.split_by_time(samples, TrainConfig.eval_fraction).train) < TrainConfig.min_samples


def _reached_back(data: Path) -> bool:
    """Whether an earlier run's scrape into `data` reached back through the whole export."""
    from doppel.slack.samples import MANIFEST_FILE

    try:
        earlier = json.loads((data / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    options = earlier.get("options") if isinstance(earlier, dict) else None
    return isinstance(options, dict) and options.get("cutoff_days") == WHOLE_EXPORT_DAYS


def _scrape_note(settings: Settings, manifest: Manifest) -> str:
    """The scrape stage's line: how many samples, and how far back when the default cutoff was widened."""
    from doppel.slack.samples import ScrapeOptions, min_length_flag

    note = f"{manifest.samples} samples of {manifest.person['name']} ({manifest.added} new)"
    if not manifest.options.get("min_length_given"):
        note += f", {min_length_flag(manifest.options)}"
    if settings.cutoff_days is None and manifest.options.get("cutoff_days") == WHOLE_EXPORT_DAYS:
        since = (manifest.time_range.get("oldest") or "")[:10]
        note += f", since {since}: their last {ScrapeOptions.cutoff_days:g} days held too few"
    return note


def _enough(manifest: Manifest) -> Manifest:
    """The manifest, or BadInput saying which filter left too few samples to train on."""
    from doppel.slack.samples import not_enough_reason
    from doppel.train.trainer import TrainConfig

    needed = TrainConfig.min_samples
    if manifest.samples < needed:
        raise BadInput(not_enough_reason(manifest, needed))
    return manifest


def _used(metrics: dict[str, Any]) -> str:
    """`, on 128 of 1,706 training samples (...)` when the budget could not use them all."""
    held = metrics.get("heldout") or {}
    used, available = held.get("train"), held.get("train_available")
    if used is None or available is None or used >= available:
        return ""
    return (
        f", on {used:,} of {available:,} training samples (the budget takes no more: the most like the "
        "person of the newest)"
    )


def _train(
    settings: Settings, layout: Layout, user: str, samples: Path, base_name: str, base_path: Path
) -> tuple[Path, dict[str, Any], bool]:
    n_samples = sum(1 for line in samples.read_text(encoding="utf-8").splitlines() if line.strip())
    train = training_settings(settings, n_samples, base_name)
    adapters = layout.adapters(user)
    from doppel.train.stage import feedback_store

    # The person's corrections (kept by the local bot) are inputs too, as training reads them (scrubbed
    # unless the scrape was not): new ones make a new adapter.
    feedback = feedback_store(layout.data(user), samples)
    learnt = hashlib.sha256(json.dumps(feedback.training_samples(), sort_keys=True).encode()).hexdigest()
    inputs = {"base_model_name": base_name, **train, "corrections": learnt}
    adapter = adapters / fingerprint(samples, base_path, inputs)
    metrics_file = adapter / "metrics.json"
    record = {"base_model": base_name, "samples_sha256": _sha256(samples), "train": train}
    from doppel.fsutil import atomic_write_text

    # train_adapter writes the directory atomically: if it exists, it is complete.
    if (adapter / "adapter_config.json").is_file() and metrics_file.is_file():
        if not (adapter / FINGERPRINT_FILE).is_file():
            # Interrupted before its record was written: without it the fidelity gate could not weigh
            # this adapter against the one serving, and would serve it unweighed.
            atomic_write_text(adapter / FINGERPRINT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        return adapter, json.loads(metrics_file.read_text(encoding="utf-8")), False

    from doppel.train.stage import StageOptions, train_stage
    from doppel.train.trainer import TrainConfig

    config = TrainConfig(
        data=samples, base_model=str(base_path), base_model_name=base_name, out=adapter, **train
    )
    # With the person's memory beside the adapter, and their corrections learnt.
    metrics = train_stage(config, StageOptions(feedback_dir=layout.data(user)))["metrics"].to_dict()
    atomic_write_text(adapter / FINGERPRINT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    # The older adapters go once the fidelity gate has chosen which one is served (`_gate`).
    return adapter, metrics, True


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def questions(demo: bool, person_id: str) -> list[Question]:
    if demo:
        from doppel.demo.workspace import demo_questions

        return [Question(p.id, p.first_name, text) for p, text in demo_questions(person_id)]
    return [Question(ASKER_ID, "Alex", text) for text in GENERIC_QUESTIONS]


def answer_heldout(
    outcome: Outcome, max_tokens: int, samples: Path, count: int = HELDOUT_QUESTIONS
) -> list[Reply]:
    """The held-out messages the person answered (the adapter never saw them), as the fidelity report
    answered them: the adapter's reply and the persona-prompted base model's beside the person's real one
    (generated once, for the report); the generic questions when the report has none."""
    examples = outcome.fidelity.get("examples") or []
    if not examples:
        return answer(outcome, questions(False, outcome.person_id), max_tokens, samples)
    return [
        Reply(_asked(example["context"]), example["adapter"], example["prompted_base"], example["real"])
        for example in examples[:count]
    ]


def _asked(context: str) -> Question:
    """The message a held-out reply answered: the context's last line, "name: text" as the samples write
    it."""
    from doppel.slack.conversation import speaker

    who, text = speaker(context.rstrip().rpartition("\n")[2])
    return Question("", who or "context", text)


def answer(
    outcome: Outcome,
    asked: Sequence[Question],
    max_tokens: int,
    samples: Path,
) -> list[Reply]:
    """Each question answered by the adapter and by the persona-prompted base model (the same base, told
    whom to be and shown a few of the person's messages from `samples`), all in one generation batch."""
    from doppel.memory.prompt import recall_for
    from doppel.memory.voice import abstention
    from doppel.serve.backend import BASE_ADAPTER, DEFAULT_PARAMS
    from doppel.serve.local import LocalBackend
    from doppel.slack.conversation import ThreadMessage, build_conversation
    from doppel.train.data import load_samples
    from doppel.train.fidelity import persona_examples, persona_prompt, with_system

    name = slug(outcome.person_id)
    backend = LocalBackend(outcome.base_model, {name: outcome.adapter})
    persona = persona_prompt(outcome.person_name, persona_examples(load_samples(samples)))
    index = local_memory(outcome.adapter)
    contexts = [[ThreadMessage(q.asker_id, q.asker_name, q.text)] for q in asked]
    recalls = [recall_for(index, context) for context in contexts]
    conversations = [
        build_conversation(
            outcome.person_name, outcome.person_id, context, channel="general", memory=recall.lines()
        )
        for context, recall in zip(contexts, recalls, strict=True)
    ]
    requests = [
        (r, c if r == name else with_system(c, persona)) for c in conversations for r in (name, BASE_ADAPTER)
    ]
    texts = backend.complete_batch(requests, DEFAULT_PARAMS.override(max_tokens=max_tokens, seed=0))
    replies = []
    for i, (question, recall) in enumerate(zip(asked, recalls, strict=True)):
        mine = texts[2 * i].strip()
        if recall.abstain and index is not None:  # the bot would not have asked the model
            mine = abstention(outcome.person_name, index.meta.get("voice"))
        replies.append(Reply(question, mine, texts[2 * i + 1].strip()))
    return replies


def local_memory(adapter: Path) -> Any:
    """The memory index beside a local adapter, if it has one."""
    from doppel.memory.index import MEMORY_DIR, MemoryIndex

    return MemoryIndex.load(adapter / MEMORY_DIR) if (adapter / MEMORY_DIR).is_dir() else None
