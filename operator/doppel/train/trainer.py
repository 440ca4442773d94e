"""`doppel train`: LoRA fine-tuning of a causal LM on samples.jsonl, with held-out evaluation.

`train_adapter(TrainConfig) -> Metrics` is the API (the CLI and `doppel local` call it). A plain loop
rather than the HF Trainer: length-grouped micro-batches (see `doppel.train.data`), the loss normalised
over every assistant token of an optimizer step, and the best adapter on eval loss is kept
in memory, which is what small datasets need (they overfit within an epoch).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from doppel.cpu import Bf16Steps, cpu_has_bf16
from doppel.errors import BadInput
from doppel.fsutil import atomic_directory
from doppel.train import data
from doppel.train.base_models import DEFAULT_LEARNING_RATE
from doppel.train.report import Metrics, perplexity

# Set by the operator on train pods that requested a GPU.
REQUIRE_GPU_ENV = "DOPPEL_REQUIRE_GPU"

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WARMUP_FRACTION = 0.05
EVALS_PER_RUN = 8
MAX_GRAD_NORM = 1.0
OOM_HINT = (
    "out of GPU memory: lower --batch-size (raising --grad-accum keeps the effective batch), "
    "--max-length or --rank"
)

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainConfig:
    data: Path
    base_model: str
    out: Path
    # The model name vLLM serves the base under; written into adapter_config.json.
    base_model_name: str | None = None
    rank: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
    lr: float = DEFAULT_LEARNING_RATE  # `doppel train` passes the base model's own (learning_rate_for)
    epochs: int = 2
    max_steps_per_epoch: int = 200
    # Optimizer steps in all, over as many whole passes of the samples as they take, the last one cut short;
    # None: `epochs` x `max_steps_per_epoch`. Steps a pass holds are each a sample never seen before.
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 4
    max_length: int = 1024
    # Training samples' length limit, when shorter than `max_length` (held-out samples keep that): a context
    # clipped of its oldest messages costs less, so a CPU budget trains on more replies.
    train_max_length: int | None = None
    eval_fraction: float = 0.15
    # Evaluate every this many steps; None: about EVALS_PER_RUN times per run.
    eval_steps: int | None = None
    early_stopping_patience: int = 3
    seed: int = 0
    min_samples: int = 20
    # The budget's limits on samples: training samples used (`data.choose`: recent first), held-out samples
    # the loss is taken on (`data.spread`); None: all.
    max_train_samples: int | None = None
    max_eval_samples: int | None = 64
    # The budget's limit on the tokens trained: a step costs its tokens, so samples longer on average (a
    # language the tokenizer cuts finely, long threads) take fewer steps in the same time; where the tokens
    # cannot take each sample once, the budget chooses (`data.budget_split`) which it trains; None: no limit.
    max_train_tokens: int | None = None
    # Loss weight of the context's tokens (the reply's weigh 1; 0: the reply alone is learnt).
    context_weight: float = 0.0
    # False: each context runs once without gradient (its keys and values cached) and only the reply is
    # backpropagated. The adapter still reads the context, but learns nothing from how it does: on 2 cores
    # about twice the samples a second where replies are a tenth of the tokens (the CPU budget's choice).
    context_gradient: bool = True
    # Training steps in bfloat16 autocast on a CPU that computes it natively (AVX512-BF16 or AMX: about 1.5x
    # the float32 speed on 2 cores); None: whenever it does. The weights and evaluation stay float32.
    cpu_bf16: bool | None = None
    device: str | None = None
    progress_bar: bool = True


def train_adapter(config: TrainConfig, on_progress: ProgressCallback | None = None) -> Metrics:
    """Train a LoRA adapter and write it, with metrics.json, to `config.out` (atomically)."""
    started = time.perf_counter()
    _check_config(config)
    samples = data.load_samples(config.data)
    if len(samples) < config.min_samples:
        raise BadInput(f"not enough data ({len(samples)} < {config.min_samples})")
    tokenizer = _load_tokenizer(config.base_model)

    stats = data.EncodeStats()
    encoded: dict[int, data.Encoded] = {}
    train_length = min(config.train_max_length or config.max_length, config.max_length)

    def fits(sample: data.Sample) -> bool:
        item = data.encode_for_training(
            sample, tokenizer, train_length, config.max_length, stats, config.context_weight
        )
        if item is not None:
            encoded[id(sample)] = item
        return item is not None

    # The budget chooses among the samples that fit --max-length, so a cut never leaves too few of them.
    held = data.budget_split(
        samples,
        config.eval_fraction,
        config.max_train_samples,
        config.max_eval_samples,
        fits=fits,
        colleagues=data.read_colleagues(Path(config.data).parent),
        cost=lambda sample: data.train_cost(encoded[id(sample)], config.context_gradient),
        max_cost=config.max_train_tokens,
        at_least=config.min_samples,
    )
    split = data.Split(
        [encoded[id(s)] for s in held.train],
        [e for s in held.eval if (e := data.encode(s, tokenizer, config.max_length, stats)) is not None],
    )
    if len(split.train) < config.min_samples:
        raise BadInput(
            f"not enough data ({len(split.train)} training samples < {config.min_samples}): of "
            f"{len(samples)}, {len(held.eval)} held out (--eval-fraction {config.eval_fraction:g}), "
            f"{held.straddling + held.leaking} next to them left out, {stats.dropped_too_long} longer than "
            f"--max-length {config.max_length}"
        )
    split.train = data.weighted(split.train)

    if os.environ.get(REQUIRE_GPU_ENV) == "1" and not torch.cuda.is_available():
        # A pod given a GPU that sees none would train for hours in float32 on the CPU instead.
        raise RuntimeError(
            f"this pod asked for a GPU but sees no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}): check the node's NVIDIA driver and device plugin, and runtimeClassName"
        )
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    try:
        model = _load_model(config, device)
        metrics = _fit(model, split, config, device, stats, on_progress)
    except torch.OutOfMemoryError:
        raise BadInput(OOM_HINT) from None
    metrics.samples = len(samples)
    metrics.person = _person(samples)
    metrics.heldout = held.summary()
    metrics.wall_time_s = time.perf_counter() - started
    metrics.peak_memory_bytes = _peak_memory(device)

    model.peft_config["default"].base_model_name_or_path = config.base_model_name or config.base_model
    with atomic_directory(config.out) as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        (tmp / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2) + "\n", encoding="utf-8")
    return metrics


def _person(samples: list[data.Sample]) -> str | None:
    """The person the samples are of, when they all name the same one."""
    names = {s.person for s in samples}
    return names.pop() if len(names) == 1 else None


def _check_config(config: TrainConfig) -> None:
    if Path(config.out).exists():
        raise BadInput(f"output directory already exists: {config.out}")
    positive = ("rank", "alpha", "epochs", "max_steps_per_epoch", "batch_size", "grad_accum", "max_length")
    for name in (*positive, "min_samples"):
        if getattr(config, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1")
    if config.max_steps is not None and config.max_steps < 1:
        raise BadInput("--max-steps must be at least 1")
    if config.max_train_tokens is not None and config.max_train_tokens < 1:
        raise BadInput("--max-train-tokens must be at least 1")
    if not 0 <= config.eval_fraction < 1:
        raise BadInput("--eval-fraction must be in [0, 1)")
    if config.context_weight > 0 and not config.context_gradient:
        raise BadInput("--context-weight learns the context: it needs the context's gradient")
    if not config.target_modules:
        raise BadInput("--target-modules must name at least one module")


def _load_tokenizer(base_model: str) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as exc:
        raise _load_failure(base_model, exc) from None
    if not tokenizer.chat_template:
        raise BadInput(f"base model {base_model!r} has no chat template")
    return tokenizer


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_failure(base_model: str, exc: BaseException) -> BadInput:
    reason = _first_line(exc)
    if "gated" in reason.lower() or "401" in reason:
        # Only a token with access to the model helps; retrying cannot.
        reason += (
            "; give the train Jobs a Hugging Face token with access (HF_TOKEN; chart: model.hfTokenSecret)"
        )
    return BadInput(f"cannot load base model {base_model!r}: {reason}")


def _load_model(config: TrainConfig, device: torch.device) -> PeftModel:
    on_gpu = device.type == "cuda"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            config.base_model, dtype=torch.bfloat16 if on_gpu else torch.float32
        )
    except (OSError, ValueError) as exc:
        raise _load_failure(config.base_model, exc) from None
    model.config.use_cache = False  # training never reuses a KV cache
    model.to(device)
    # Checkpointed layers drop a key-value cache when they recompute, so the replies alone would attend to
    # no context; and without the context's gradient there are few activations to spare anyway.
    if on_gpu and config.context_gradient:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise BadInput(f"--target-modules: {_first_line(exc)}") from None


def _fit(
    model: PeftModel,
    split: data.Split,
    config: TrainConfig,
    device: torch.device,
    stats: data.EncodeStats,
    on_progress: ProgressCallback | None,
) -> Metrics:
    rng = random.Random(config.seed)
    per_step = config.batch_size * config.grad_accum
    pass_steps = math.ceil(len(split.train) / per_step)
    if config.max_steps is not None:  # steps in all, over whole passes
        steps_per_epoch, total_steps = pass_steps, config.max_steps
    else:
        steps_per_epoch = min(pass_steps, config.max_steps_per_epoch)
        total_steps = steps_per_epoch * config.epochs
    if config.max_train_tokens is not None:
        costs = [data.train_cost(item, config.context_gradient) for item in split.train]
        mean_cost = sum(costs) / len(costs)
        total_steps = max(1, min(total_steps, int(config.max_train_tokens / (per_step * mean_cost))))
    eval_every = config.eval_steps or max(1, total_steps // EVALS_PER_RUN)
    eval_batches = data.eval_batches(split.eval, config.batch_size)

    params = [p for p in model.parameters() if p.requires_grad]
    autocast = device.type == "cpu" and (cpu_has_bf16() if config.cpu_bf16 is None else config.cpu_bf16)
    bf16_step = Bf16Steps(model, autocast)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, math.ceil(WARMUP_FRACTION * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
    metrics = Metrics(
        train_samples=len(split.train),
        eval_samples=len(split.eval),
        total_steps=total_steps,
        clipped=stats.clipped,
        reply_cut=stats.reply_cut,
        dropped_too_long=stats.dropped_too_long,
        device=device.type,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        config=config_dict(config),
    )
    with model.disable_adapter():
        metrics.base_eval_loss = evaluate(model, eval_batches, device)
    # The best of the trained adapters, never the untrained one: an adapter is asked for even when it does
    # not beat the base model on the held-out replies (a person of few samples, a budget too short), and
    # the report must say so rather than measure the base model under the adapter's name.
    best_loss, best_state, best_step = math.inf, _snapshot(model), 0
    evals_without_gain = 0

    bar = tqdm(total=total_steps, disable=not config.progress_bar, file=sys.stderr, desc="train")
    train_seconds = 0.0
    step = 0
    stop = False
    model.train()
    for _ in range(math.ceil(total_steps / steps_per_epoch)):
        steps = data.epoch_steps(
            split.train, config.batch_size, config.grad_accum, rng, config.context_gradient
        )
        for group in steps[:steps_per_epoch]:
            tick = time.perf_counter()
            with bf16_step():
                loss = _train_step(model, group, device)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - tick
            step += 1
            metrics.tokens += sum(b.tokens for b in group)
            metrics.padding_tokens += sum(b.padding for b in group)
            metrics.label_tokens += sum(b.label_tokens for b in group)
            metrics.train_loss.append({"step": step, "loss": loss})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            _emit(on_progress, "progress", step, total_steps, step / steps_per_epoch, loss=loss)

            if eval_batches and (step % eval_every == 0 or step == total_steps):
                eval_loss = evaluate(model, eval_batches, device)
                metrics.eval_loss.append({"step": step, "loss": eval_loss})
                _emit(on_progress, "eval", step, total_steps, step / steps_per_epoch, eval_loss=eval_loss)
                if eval_loss < best_loss:
                    best_loss, best_state, best_step = eval_loss, _snapshot(model), step
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
                    stop = evals_without_gain >= config.early_stopping_patience
            if stop or step == total_steps:
                break
        if stop or step == total_steps:
            break
    bar.close()

    if eval_batches:
        _restore(model, best_state)
        metrics.best_step = best_step
        metrics.adapter_eval_loss = best_loss
    else:
        metrics.best_step = step
    metrics.steps = step
    metrics.epochs = step / steps_per_epoch if steps_per_epoch else 0.0
    metrics.stopped_early = stop
    metrics.base_perplexity = perplexity(metrics.base_eval_loss)
    metrics.adapter_perplexity = perplexity(metrics.adapter_eval_loss)
    metrics.train_seconds = train_seconds
    metrics.tokens_per_second = metrics.tokens / train_seconds if train_seconds else 0.0
    return metrics


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay; `step` 0 is the first optimizer step, which already learns
    (transformers' schedule gives it a learning rate of 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup + 1) / (total - warmup + 1)))


def _train_step(
    model: PeftModel, group: Sequence[data.Batch] | Sequence[data.ReplyBatch], device: torch.device
) -> float:
    """Forward/backward over the micro-batches of one optimizer step; returns the mean token loss."""
    # Normalise by every label token of the step, so long and short micro-batches weigh per token.
    label_weight = max(1.0, sum(b.label_weight for b in group))
    total = 0.0
    for batch in group:
        summed = (
            reply_loss_sum(model, batch, device)
            if isinstance(batch, data.ReplyBatch)
            else token_loss_sum(model, batch, device)
        )
        loss = summed / label_weight
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[data.Batch], device: torch.device) -> float | None:
    """Mean loss per assistant token over `batches`, with dropout off."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    tokens = 0
    for batch in batches:
        if batch.label_tokens:
            loss_sum += token_loss_sum(model, batch, device).item()
            tokens += batch.label_tokens
    model.train(was_training)
    return loss_sum / max(tokens, 1)


# Causal LMs whose logits are exactly `lm_head(last hidden state)` (no soft-capping or scaling), so the
# head can be applied to the labelled positions alone.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3"})


def token_loss_sum(model: torch.nn.Module, batch: data.Batch, device: torch.device) -> torch.Tensor:
    """The summed (weighted) cross-entropy of every labelled token of `batch`.

    The LM head runs only where the next token is labelled (without a context weight, the replies: about a
    tenth of a Slack thread's tokens), and in chunks of `HEAD_CHUNK` positions whose logits are recomputed
    for the backward pass rather than kept: [tokens x vocabulary] in float32, and as much again for their
    gradient, would be most of a step's memory. Other architectures go through the model's own logits.
    """
    tensors = _tensors(batch, device)
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    targets = tensors["labels"][:, 1:]
    learned = targets != data.IGNORE_INDEX
    weights = (
        torch.tensor(batch.weights, device=device)[:, 1:][learned]
        if batch.weights is not None
        else torch.ones(int(learned.sum()), device=device)
    )
    if getattr(causal_lm.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        if batch.weights is None:
            n = batch.label_tokens
            return model(**tensors, num_items_in_batch=n).loss * n
        out = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"])
        return _weighted_loss(out.logits[:, :-1][learned], targets[learned], weights)
    hidden = causal_lm.get_decoder()(
        input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
    ).last_hidden_state[:, :-1][learned]
    return _chunked_head_loss(causal_lm.get_output_embeddings(), hidden, targets[learned], weights)


def reply_loss_sum(model: torch.nn.Module, batch: data.ReplyBatch, device: torch.device) -> torch.Tensor:
    """The summed cross-entropy of every reply token of `batch`, backpropagated through the replies alone:
    the contexts run first without gradient, their keys and values cached, and the replies attend to them."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    # transformers 5 calls it activation checkpointing, earlier versions gradient checkpointing.
    checkpointing = getattr(causal_lm, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(causal_lm, "is_gradient_checkpointing", False)
    if checkpointing and causal_lm.training:
        raise ValueError(
            "gradient checkpointing drops the contexts' cache: train the replies alone without it"
        )
    plain_head = getattr(causal_lm.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
    network = causal_lm.get_decoder() if plain_head else causal_lm
    context_mask = torch.tensor(batch.context_mask, device=device)
    reply_mask = torch.tensor(batch.reply_mask, device=device)
    # Left-padded contexts: each position counts from its own first token, and so do the replies after them.
    context_positions = (context_mask.cumsum(1) - 1).clamp(min=0)
    reply_positions = context_mask.sum(1, keepdim=True) + torch.arange(reply_mask.shape[1], device=device)
    with torch.no_grad():
        context = network(
            input_ids=torch.tensor(batch.context_ids, device=device),
            attention_mask=context_mask,
            position_ids=context_positions,
            use_cache=True,
        )
    name = _cache_argument(type(network))
    cache = {name: getattr(context, name)}
    out = network(
        input_ids=torch.tensor(batch.reply_ids, device=device),
        attention_mask=torch.cat([context_mask, reply_mask], dim=1),
        position_ids=reply_positions,
        use_cache=False,
        **cache,
    )
    targets = torch.tensor(batch.targets, device=device)
    learned = targets != data.IGNORE_INDEX
    weights = torch.ones(int(learned.sum()), device=device)
    if not plain_head:
        return _weighted_loss(out.logits[learned], targets[learned], weights)
    head = causal_lm.get_output_embeddings()
    return _chunked_head_loss(head, out.last_hidden_state[learned], targets[learned], weights)


@functools.cache
def _cache_argument(network: type[torch.nn.Module]) -> str:
    """What `network.forward` calls its key-value cache: `cache` in transformers 5, `past_key_values` in 4."""
    return "cache" if "cache" in inspect.signature(network.forward).parameters else "past_key_values"


def _chunked_head_loss(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        part = slice(start, start + HEAD_CHUNK)
        total = total + checkpoint(
            _head_loss, head, hidden[part], targets[part], weights[part], use_reentrant=False
        )
    return total


HEAD_CHUNK = 256  # positions whose logits exist at once: 256 x 49,152 x 4 bytes = 50 MB for SmolLM2


def _head_loss(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    return _weighted_loss(head(hidden), targets, weights)


def _weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return (losses * weights).sum()


def _tensors(batch: data.Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor(batch.input_ids, device=device),
        "labels": torch.tensor(batch.labels, device=device),
        "attention_mask": torch.tensor(batch.attention_mask, device=device),
    }


def _snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])


def _emit(
    callback: ProgressCallback | None, event: str, step: int, total: int, epoch: float, **values: float | None
) -> None:
    if callback:
        callback({"event": event, "step": step, "total_steps": total, "epoch": round(epoch, 4), **values})


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the peak resident size of this process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON-able values, for metrics.json."""
    return json.loads(json.dumps(asdict(config), default=str))


def resolver_entry(adapter: Path, entry: Path, base_model: str) -> Path:
    """Make `entry` a directory vLLM's filesystem LoRA resolver accepts for `adapter`: its files linked,
    and its adapter_config.json naming the base model as vLLM's `--model` argument (`base_model`), which
    is what the resolver compares with (not the served name)."""
    adapter = Path(adapter).resolve()
    with atomic_directory(Path(entry), replace=True) as tmp:
        for item in adapter.iterdir():
            if item.name == "adapter_config.json":
                config = json.loads(item.read_text(encoding="utf-8"))
                config["base_model_name_or_path"] = base_model
                (tmp / item.name).write_text(json.dumps(config, indent=2), encoding="utf-8")
            else:
                (tmp / item.name).symlink_to(item)
    return Path(entry)
