"""What `doppel local` was asked to do and where it writes: the command line's settings, the work
directory's layout, the demo's training budgets and the fingerprint that names an adapter by its inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppel.errors import BadInput
from doppel.slack.samples import MEMORY_FILE
from doppel.train.base_models import BUILTIN_MODELS, check_model_dir, looks_like_path

FINGERPRINT_FILE = "fingerprint.json"
# The demo's training budget per base model. SmolLM2 (the default) trains at ~100-200 tokens/s on 2 cores, so
# the demo affords tens of small steps: a high learning rate makes the most of them, and the adapter kept is
# the best on held-out loss, so the budget cannot overfit it. The tiny random model (mechanical tests) learns
# from scratch and needs many cheap steps.
DEMO_TRAINING: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "rank": 16,
        "alpha": 32,
        "dropout": 0.0,
        # The demo's 67 templated samples, seen several times, are copied at a higher rate: with memory's
        # 128-token budget, 1e-3 gave replies repeating 12+ words of a training message 75% of the time
        # (distinct 0.25); 5e-4 gives 0% (distinct 0.75, held-out loss -52%).
        "lr": 5e-4,
        # 8 samples a step in micro-batches of 2: a float32 forward/backward on CPU (no gradient
        # checkpointing there) keeps about 1.3 MB of activations per token of SmolLM2-135M, so 8 x 512
        # tokens at once peaked at 8.6 GB; 2 x 512 keep it near 1.3 GB, at the same speed per token.
        "batch_size": 2,
        "grad_accum": 4,
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
# A CPU run of a real workspace uses the demo's budget, scaled to the cores (the steps, up to 4 times), with
# the held-out loss taken on this many samples spread over the held-out period: a few minutes on 2 cores
# whatever the person's volume. The training samples used are the newest distinct ones (data.choose).
CPU_EVAL_SAMPLES = 24
# Evaluations during training: each costs about a step (24 samples, forward only). One, at the end: the
# cosine schedule's last step is the adapter to keep, and the held-out set then chooses nothing it reports on.
CPU_EVALS = 1
CPU_STEP_SCALE_MAX = 4
# On a CPU that computes bfloat16 natively, training steps run in bfloat16 autocast, 1.3x as fast on 2 cores
# (tests/bench/bench_train.py): a real workspace's budget takes more steps in the same time. A quarter more,
# not the whole 1.3x: the memory in every sample (all the person's messages, memory.jsonl) makes samples
# longer, and hyperledger's jyellick, the slowest of the real exports' people, took 8:31 at 24 steps.
CPU_BF16_STEP_SCALE = 1.25
# A real workspace's budget whose steps cannot take each of the person's samples once runs each sample's
# context once without gradient and backpropagates its reply alone (TrainConfig.context_gradient): the
# replies are a tenth of a sample's tokens, so the same minutes train about twice the samples (ghaskins, 216
# of his 425 learnt whole, the context at a quarter weight: held-out loss -18.8%; all 425, replies alone:
# -20.0%). Where they can (a person of few samples), more passes over the replies alone would learn them by
# heart, and the context is learnt at this weight instead (haskell-jp's igrep, 78 samples in 25 steps:
# -25.0% and 0.33 distinct replies, against -23.4% and 0.00 with the replies alone; ghaskins, 16 steps:
# -11.7% at weight 0, -12.5% at 0.25). The replies alone are learnt once at most, the time left over after
# one pass not spent: a person of 250 to 400 samples would otherwise get one and a half or two passes
# (hyperledger's thojest, 273 training samples: -10.0% in 57 steps, -12.3% in one pass of 35; tuand, 329:
# -21.5% in 57, -21.2% in one of 42, a minute sooner; ghaskins' 425 take 54 steps instead of 57).
EXPORT_CONTEXT_WEIGHT = 0.25
# The replies alone in micro-batches of this many samples of similar reply length: as fast as 8 at once,
# 1.4 GB less at the peak for hyperledger's jyellick.
CPU_REPLY_MICRO_BATCH = 4
# A real workspace's budget passes over a person's few samples at most this many times: the steps a large
# export needs would learn a small one by heart (haskell-jp's fumieval, 22 training samples: held-out loss
# -10.9% at 6 steps, about 2 passes; -10.7% at 10; -2.5% at 20, 7 passes).
CPU_MAX_EPOCHS = 3
# A real workspace's budget is a number of tokens, its steps' cost: its steps at this many a sample (at 512
# tokens, hyperledger's five most active average 300 to 390, haskell-jp's kakkun61 about 420)...
CPU_TOKENS_PER_SAMPLE = 400
# ...spent on training samples clipped to this many tokens, their oldest context first (the held-out ones
# keep the budget's 512), in as many steps as those tokens hold: more of the person in the same time, and a
# person whose samples are longer (Japanese, which SmolLM2's tokenizer cuts into about a token a byte; long
# threads) takes no longer. ghaskins, about 63,000 tokens each: 192 samples of up to 512 tokens -18.2%; 216
# of up to 320, -19.3%; 256 of up to 256, -19.0% (their memory and the message answered crowd the rest out).
CPU_TRAIN_MAX_LENGTH = 320
# What samples clipped to CPU_TRAIN_MAX_LENGTH average (ghaskins 293): the steps the budget's tokens hold...
CPU_CLIPPED_SAMPLE_TOKENS = 290
# ...and what they cost with their context without gradient, in tokens trained whole (`data.train_cost`;
# hyperledger's five most active 111 to 183).
CPU_CLIPPED_SAMPLE_COST = 140
# The newest samples `doppel local` keeps (the operator and `doppel scrape`: api.MAX_SAMPLES). Its CPU budget
# trains about 450 with the replies alone (hyperledger's five most active: every one of the 425 before the
# held-out cut), and the held-out cut is a share of them all: more would move the cut back.
LOCAL_MAX_SAMPLES = 500
DEMO_BASE_MODEL = "smollm2-135m"
# Replies are short: Slack messages, and generation on CPU is not free.
DEFAULT_REPLY_TOKENS = 120


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
    min_length: int | None = None  # shortest message that makes a sample (None: ingestion's default)
    reply_tokens: int = DEFAULT_REPLY_TOKENS
    scrub: bool = True  # secrets, emails and phone numbers out of the samples
    # Serve a newly trained adapter even when the fidelity gate finds it worse than the one serving.
    force_promotion: bool = False

    def check(self) -> None:
        """Reject contradictory or missing options before anything is written."""
        if sum([self.demo, self.export is not None, self.slack_token is not None]) != 1:
            raise BadInput("give exactly one of --demo, --export ZIP or --slack-token TOKEN")
        if not self.demo and not self.user:
            raise BadInput("--user is required with --export or --slack-token")
        if Path(self.workdir).exists() and not Path(self.workdir).is_dir():
            raise BadInput(f"--workdir {self.workdir} is not a directory")
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
        if self.min_length is not None and self.min_length < 1:
            raise BadInput(f"--min-length must be at least 1, got {self.min_length}")
        if self.cutoff_days is not None and self.cutoff_days <= 0:
            raise BadInput(f"--cutoff-days must be positive, got {self.cutoff_days}")


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
        return self.root / "data" / slug(user)

    def adapters(self, user: str) -> Path:
        return self.root / "adapters" / slug(user)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.strip().lstrip("@").casefold()).strip("-.") or "user"


def local_models() -> tuple[str, ...]:
    """Base model names `doppel local` knows without a path: the built-in ones and the tiny model."""
    from doppel.train.tiny import TINY_MODEL_NAME

    return (*BUILTIN_MODELS, TINY_MODEL_NAME)


def training_settings(
    settings: Settings, n_samples: int, base_name: str, cores: int | None = None, bf16: bool | None = None
) -> dict[str, Any]:
    """TrainConfig fields for this run, besides data, base model and output: for a base model with a CPU
    budget (the built-in ones, the tiny model), that budget sized to the machine (its `cores`; whether it
    computes `bf16` natively; the demo: as is) and the data (the samples it can use: `max_train_samples`)."""
    import os

    import torch

    from doppel.cpu import cpu_has_bf16
    from doppel.train.trainer import TrainConfig

    budgeted = base_name in DEMO_TRAINING and (settings.demo or not torch.cuda.is_available())
    chosen: dict[str, Any] = dict(DEMO_TRAINING[base_name]) if budgeted else {}
    steps = settings.max_steps
    budget_tokens = None  # the tokens (time) of the budget's own steps
    replies_alone = False  # the context without gradient: steps the user asks for train whole samples
    if budgeted:
        bf16 = cpu_has_bf16() if bf16 is None else bf16
        chosen["cpu_bf16"] = bf16  # named, so that the fingerprint tells the two kinds of CPU apart
        scale = 1 if settings.demo else min(max((cores or os.cpu_count() or 2) // 2, 1), CPU_STEP_SCALE_MAX)
        if bf16 and not settings.demo:
            scale *= CPU_BF16_STEP_SCALE
        chosen["max_eval_samples"] = CPU_EVAL_SAMPLES
        if steps is None:
            steps = round(DEMO_MAX_STEPS[base_name] * scale)
            if not settings.demo:
                # The tokens of the budget's steps, in as many steps of clipped samples as they hold.
                batch = chosen["batch_size"] * chosen["grad_accum"]
                budget_tokens = steps * batch * CPU_TOKENS_PER_SAMPLE
                per_epoch = _steps_per_epoch_at_least(n_samples, chosen["eval_fraction"], batch)
                steps = budget_tokens // (batch * CPU_CLIPPED_SAMPLE_TOKENS)
                replies_alone = steps < per_epoch
                if replies_alone:
                    steps = budget_tokens // (batch * CPU_CLIPPED_SAMPLE_COST)
                steps = min(steps, CPU_MAX_EPOCHS * per_epoch)
        if not settings.demo:
            chosen["eval_steps"] = max(1, steps // CPU_EVALS)
            chosen["train_max_length"] = CPU_TRAIN_MAX_LENGTH
            batch = chosen["batch_size"] * chosen["grad_accum"]
            if replies_alone:
                chosen["context_gradient"] = False
                chosen["batch_size"] = min(batch, CPU_REPLY_MICRO_BATCH)
                chosen["grad_accum"] = batch // chosen["batch_size"]
                chosen["max_train_tokens"] = budget_tokens  # only the budget's own steps train replies alone
            else:
                chosen["context_weight"] = EXPORT_CONTEXT_WEIGHT
                chosen["max_train_tokens"] = min(
                    steps * batch * CPU_TRAIN_MAX_LENGTH, budget_tokens or math.inf
                )
    if base_name in BUILTIN_MODELS and not settings.demo:
        # A real workspace, on a CPU budget or a GPU, learns at the built-in model's own rate, as
        # `doppel train` does; faster than the demo's: its samples are many and varied, each seen once, so a
        # higher rate does not fit one template (ghaskins, 16 steps of 8: held-out loss -9.6% at 1e-3, -11.7%
        # at 3e-3; the demo's 67 samples, seen several times, copy at 3e-3).
        chosen["lr"] = BUILTIN_MODELS[base_name].learning_rate
    if steps is not None:
        view = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | chosen
        batch = view["batch_size"] * view["grad_accum"]
        if replies_alone or steps <= _steps_per_epoch_at_least(n_samples, view["eval_fraction"], batch):
            # The replies alone: one pass at most (EXPORT_CONTEXT_WEIGHT's comment).
            chosen.update(epochs=1, max_steps_per_epoch=steps)
        else:
            # More steps than the bound: whole passes over every sample, the last cut short, so that each of
            # the person's replies is learnt once before any is learnt again.
            chosen["max_steps"] = steps
        if budgeted and steps * batch < n_samples:
            # More samples than the steps can take (the bound on a pass is conservative, so this holds a
            # little beyond it too): the newest, most characteristic they can, rather than a random part of
            # them all. Never below what training requires.
            chosen["max_train_samples"] = max(steps * batch, view["min_samples"])
    return chosen


def _steps_per_epoch_at_least(n_samples: int, eval_fraction: float, batch: int) -> int:
    """A safe lower bound on the optimizer steps of one epoch (the thread split holds out a bit more
    than `eval_fraction` of the samples when threads are uneven)."""
    return max(1, int(n_samples * (1 - eval_fraction - 0.1)) // batch)


def fingerprint(samples: Path, base_model: Path, train: dict[str, Any]) -> str:
    """A hash of what determines the adapter: the samples and the person's memory beside them, the base
    model's files and the settings."""
    digest = hashlib.sha256(Path(samples).read_bytes())
    memory = Path(samples).with_name(MEMORY_FILE)
    if memory.is_file():
        digest.update(memory.read_bytes())
    model_files = sorted(
        (p.name, p.stat().st_size) for p in Path(base_model).iterdir() if p.is_file() and p.suffix != ".lock"
    )
    config = (Path(base_model) / "config.json").read_text(encoding="utf-8")
    identity = {"model_files": model_files, "model_config": config, "train": train}
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
