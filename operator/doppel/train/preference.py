"""Preference tuning of a trained LoRA adapter on the person's corrections (TRL's DPO trainer).

A correction says, for one prompt, what the person would have written (chosen) instead of what the doppel
did write (rejected): a preference pair. With at least `PreferenceConfig.min_pairs` of them, `prefer`
continues training the same adapter with DPO, the reference being a frozen copy of that adapter (TRL adds
it when given a `PeftModel`), and writes the result, atomically, as an adapter of the same shape (same rank
and target modules: vLLM loads it like any other).

`margin` is the figure that says it worked: the mean, over the pairs, of log p(chosen) - log p(rejected)
under the adapter, before and after (`PreferenceResult`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

from doppel.errors import BadInput
from doppel.fsutil import atomic_directory

LOG = logging.getLogger(__name__)
METRICS_KEY = "preference"


@dataclass
class PreferenceConfig:
    adapter: Path  # the trained adapter (PEFT directory)
    base_model: str
    out: Path  # where the tuned adapter goes (may be `adapter` itself: replaced atomically)
    min_pairs: int = 8
    beta: float = 0.1
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 2
    max_length: int = 1024
    seed: int = 0
    device: str | None = None


@dataclass
class PreferenceResult:
    pairs: int
    steps: int = 0
    skipped: str | None = None  # why no tuning happened
    margin_before: float | None = None
    margin_after: float | None = None
    loss: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prefer(config: PreferenceConfig, pairs: Sequence[dict[str, Any]]) -> PreferenceResult:
    """DPO on `pairs` (TRL's conversational format: prompt, chosen, rejected message lists) when there are
    enough; the tuned adapter replaces `config.out`, its metrics.json gaining a `preference` section."""
    started = time.perf_counter()
    if len(pairs) < config.min_pairs:
        return PreferenceResult(len(pairs), skipped=f"{len(pairs)} preference pairs < {config.min_pairs}")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    try:
        base = AutoModelForCausalLM.from_pretrained(
            config.base_model, dtype=torch.bfloat16 if on_gpu else torch.float32
        )
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot load base model {config.base_model!r}: {exc}") from None
    model = PeftModel.from_pretrained(base, str(config.adapter), is_trainable=True).to(device)
    before = margin(model, tokenizer, pairs, device)
    with tempfile.TemporaryDirectory(prefix="doppel-dpo-") as scratch:
        args = DPOConfig(
            output_dir=scratch,
            beta=config.beta,
            learning_rate=config.lr,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            max_length=config.max_length,
            seed=config.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=on_gpu,
            use_cpu=not on_gpu,
            disable_tqdm=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list([_pair(p) for p in pairs]),
                processing_class=tokenizer,
            )
            trainer.remove_callback(PrinterCallback)  # stdout carries the stage's JSON result
            output = trainer.train()
    after = margin(model, tokenizer, pairs, device)
    result = PreferenceResult(
        pairs=len(pairs),
        steps=int(output.global_step),
        margin_before=round(before, 4),
        margin_after=round(after, 4),
        loss=round(float(output.training_loss), 4),
        seconds=round(time.perf_counter() - started, 1),
    )
    _save(model, config, result)
    return result


def _pair(pair: dict[str, Any]) -> dict[str, Any]:
    return {key: list(pair[key]) for key in ("prompt", "chosen", "rejected")}


def _save(model: PeftModel, config: PreferenceConfig, result: PreferenceResult) -> None:
    """The tuned "default" adapter (not TRL's frozen "ref" copy), with the trained adapter's other files."""
    source = Path(config.adapter)
    with atomic_directory(Path(config.out), replace=True) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"], save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)
        for item in source.iterdir():
            if item.is_file() and not (tmp / item.name).exists():
                (tmp / item.name).write_bytes(item.read_bytes())
        metrics_file = tmp / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
        metrics[METRICS_KEY] = result.to_dict()
        metrics_file.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        # PEFT writes the base model it was loaded from; keep the name vLLM serves it under.
        config_file = tmp / "adapter_config.json"
        trained = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
        written = json.loads(config_file.read_text(encoding="utf-8"))
        written["base_model_name_or_path"] = trained.get("base_model_name_or_path")
        config_file.write_text(json.dumps(written, indent=2), encoding="utf-8")


@torch.no_grad()
def margin(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], device: torch.device) -> float:
    """Mean over `pairs` of log p(chosen) - log p(rejected), each the summed log-probability of the reply's
    tokens after its prompt."""
    was_training = model.training
    model.eval()
    total = 0.0
    for pair in pairs:
        chosen, rejected = (pair[key][-1]["content"] for key in ("chosen", "rejected"))
        total += completion_logprob(model, tokenizer, pair["prompt"], chosen, device)
        total -= completion_logprob(model, tokenizer, pair["prompt"], rejected, device)
    model.train(was_training)
    return total / max(len(pairs), 1)


def completion_logprob(
    model: Any, tokenizer: Any, prompt: Sequence[dict[str, str]], reply: str, device: torch.device
) -> float:
    head = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    inputs = torch.tensor([ids], device=device)
    logits = model(input_ids=inputs).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = inputs[0, 1:]
    picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return float(picked[len(head_ids) - 1 :].sum())
