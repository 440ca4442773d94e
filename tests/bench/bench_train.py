"""Benchmark: training throughput of `doppel train`'s trainer against a naive Hugging Face Trainer baseline.

Both train the same LoRA (same rank, targets, learning rate, batch size, number of steps) on the same
samples (Slack-like threads of very different lengths, rendered and labelled by `doppel.train.data`), each in
its own process so their peak memory is their own. The baseline is what one writes first:
`transformers.Trainer`, random batches padded to the longest sample, no length grouping. Throughput counts
real tokens only (padding is work, not progress). Prints tokens/s of each, the ratio (target >= 1.5x),
padding share and peak memory. On a CPU that computes bfloat16 natively, the trainer steps in bfloat16
autocast; there it is also run in float32, and that ratio printed too.

With --replies it compares instead the two ways `doppel local`'s CPU budget could train a real workspace's
samples (clipped to 320 tokens, rank 16, 8 samples a step): whole samples with the context learnt at a
quarter weight (2 x 4 micro-batches), and the reply alone with the context run without gradient (4 x 2), the
budget's way; it prints samples/s of each, their ratio, and the ratio `data.train_cost` predicts.

Run: .venv/bin/python tests/bench/bench_train.py          SmolLM2-135M-Instruct (the built-in model), CPU
     .venv/bin/python tests/bench/bench_train.py --tiny   the tiny random model (mechanics, seconds)
     .venv/bin/python tests/bench/bench_train.py --replies   whole samples against replies alone (SmolLM2)
GPU (not run in CI): .venv/bin/python tests/bench/bench_train.py --device cuda --llama-1b
  trains a randomly initialised model with Llama-3.2-1B's dimensions in bf16 and also prints model FLOPs
  utilisation: LoRA training costs about 4 x parameters x tokens FLOPs (forward 2, backward through frozen
  weights 2), measured against this GPU's bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from doppel.slack.conversation import ThreadMessage, build_conversation
from doppel.train import data
from doppel.train.base_models import ensure_builtin
from doppel.train.tiny import make_tiny_model

_TEXT = (
    "the deploy build is red again since this morning can you check logs after lunch flaky test payments "
    "service rollback database latency spike dashboard alert backup schedule review pull request parser "
    "release notes customer call friday standup design doc issues channel comments thanks great"
)
WORDS = tuple(_TEXT.split())
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


def write_samples(path: Path, count: int, seed: int = 0) -> None:
    """Slack-like samples: 1 to 10 context messages of 3 to 60 words, so lengths vary a lot."""
    rng = random.Random(seed)
    people = [("U1", "Bob"), ("U2", "Ana"), ("U0PAT", "Pat")]
    rows = []
    for index in range(count):
        context = [
            ThreadMessage(*rng.choice(people), " ".join(rng.choices(WORDS, k=rng.randint(3, 60))))
            for _ in range(rng.randint(1, 10))
        ]
        reply = " ".join(rng.choices(WORDS, k=rng.randint(2, 40)))
        messages = build_conversation("Pat", "U0PAT", context, reply)
        rows.append(json.dumps({"messages": messages, "meta": {"thread_id": f"t{index}"}}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def make_llama_1b(tiny: Path, out: Path) -> Path:
    """Random Llama-3.2-1B-sized weights (bf16) with the tiny model's tokenizer (its ids fit any vocab)."""
    config = LlamaConfig(**LLAMA_1B, max_position_embeddings=4096, dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_bytes((tiny / name).read_bytes())
    return out


def peak_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# `doppel local`'s budget for a real workspace (doppel.local.settings), whole samples or the replies alone.
BUDGET = {"rank": 16, "alpha": 32, "max_length": 512, "train_max_length": 320}
WHOLE = {**BUDGET, "batch_size": 2, "grad_accum": 4, "context_weight": 0.25}
REPLIES = {**BUDGET, "batch_size": 4, "grad_accum": 2, "context_gradient": False}


def run_ours(args: argparse.Namespace, cpu_bf16: bool | None = None, **budget: Any) -> dict[str, Any]:
    from doppel.train.trainer import TrainConfig, train_adapter

    settings: dict[str, Any] = {
        "rank": args.rank,
        "alpha": 2 * args.rank,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        **budget,
    }
    metrics = train_adapter(
        TrainConfig(
            data=args.samples,
            base_model=str(args.model),
            out=args.workdir / args.worker,
            epochs=1,
            max_steps_per_epoch=args.steps,
            eval_fraction=0.0,
            min_samples=1,
            cpu_bf16=cpu_bf16,
            device=args.device,
            progress_bar=False,
            **settings,
        )
    )
    return {
        "tokens": metrics.tokens,
        "label_tokens": metrics.label_tokens,
        "samples": metrics.steps * settings["batch_size"] * settings["grad_accum"],
        "seconds": metrics.train_seconds,
        "padding": metrics.padding_tokens,
        "peak_memory": peak_memory(args.device),
    }


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """transformers.Trainer with random batches padded to the longest sample."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    stats = data.EncodeStats()
    encoded = [e for s in data.load_samples(args.samples) if (e := data.encode(s, tokenizer, 1024, stats))]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    counted = {"tokens": 0, "padding": 0}

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        counted["tokens"] += sum(len(row["input_ids"]) for row in batch)
        counted["padding"] += sum(width - len(row["input_ids"]) for row in batch)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (width - len(values))

        return {
            "input_ids": torch.tensor([pad(r["input_ids"], 0) for r in batch]),
            "labels": torch.tensor([pad(r["labels"], data.IGNORE_INDEX) for r in batch]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch]),
        }

    on_gpu = args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if on_gpu else torch.float32
    )
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    training_args = TrainingArguments(
        output_dir=str(args.workdir / "baseline"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=3e-4,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=not on_gpu,
        bf16=on_gpu,
        gradient_checkpointing=on_gpu,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collate)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {**counted, "seconds": seconds, "peak_memory": peak_memory(args.device)}


def matmul_flops(device: str) -> float:
    """Measured bf16 matmul rate (FLOP/s) of this GPU: the denominator of MFU."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    runs = 20
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * runs / (time.perf_counter() - started)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker == "ours-float32":
        result = run_ours(args, cpu_bf16=False)
    elif args.worker in ("whole", "replies"):
        result = run_ours(args, **(WHOLE if args.worker == "whole" else REPLIES))
    else:
        result = run_ours(args) if args.worker == "ours" else run_baseline(args)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def spawn(args: argparse.Namespace, which: str) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--worker", which, "--model", str(args.model),
        "--samples", str(args.samples), "--workdir", str(args.workdir), "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--rank", str(args.rank),
        "--device", args.device,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def replies_against_whole(args: argparse.Namespace, label: str) -> None:
    """The budget's two ways on the same samples and steps: samples a second, measured and predicted."""
    args.steps = args.steps or 8
    print(f"model: {label}; device {args.device}; {args.steps} steps of 8 samples clipped to 320 tokens")
    runs = {which: spawn(args, which) for which in ("whole", "replies")}
    for which, result in runs.items():
        rate = result["samples"] / result["seconds"]
        print(
            f"{which:8s} {rate:6.2f} samples/s  {result['tokens_per_s']:6.0f} tokens/s  "
            f"peak memory {result['peak_memory'] / 2**20:6.0f} MiB"
        )
    whole, replies = runs["whole"], runs["replies"]
    measured = (replies["samples"] / replies["seconds"]) / (whole["samples"] / whole["seconds"])
    context = replies["tokens"] - replies["label_tokens"]
    cost = data.CACHED_CONTEXT_TOKEN_COST * context + data.REPLY_PART_TOKEN_COST * replies["label_tokens"]
    predicted = (whole["tokens"] / whole["samples"]) / (cost / replies["samples"])
    print(
        f"replies {replies['label_tokens'] / replies['tokens']:.1%} of the tokens; samples a second, replies "
        f"alone / whole: {measured:.2f}x measured, {predicted:.2f}x as data.train_cost predicts (what the "
        "budget's steps are sized by)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--llama-1b", action="store_true", help="Llama-3.2-1B dimensions, random weights.")
    parser.add_argument("--tiny", action="store_true", help="The tiny random model instead of SmolLM2.")
    parser.add_argument("--count", type=int, default=256, help="Samples to write.")
    parser.add_argument("--steps", type=int, help="Optimizer steps [default: 12; SmolLM2 on CPU: 4].")
    parser.add_argument("--batch-size", type=int, help="Micro-batch [default: 16; SmolLM2 on CPU: 4].")
    parser.add_argument("--grad-accum", type=int, help="Micro-batches a step [default: 1; SmolLM2 CPU: 4].")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--replies", action="store_true", help="Whole samples against the replies alone.")
    # Internal: one measured run in this process.
    parser.add_argument(
        "--worker", choices=("ours", "ours-float32", "baseline", "whole", "replies"), help=argparse.SUPPRESS
    )
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        args.workdir = Path(tmp)
        args.samples = args.workdir / "samples.jsonl"
        write_samples(args.samples, args.count)
        args.model = make_tiny_model(args.workdir / "tiny")
        if args.llama_1b:
            args.model = make_llama_1b(args.model, args.workdir / "llama-1b")
            label = "Llama-3.2-1B dims, random init"
        elif args.tiny:
            label = "tiny Llama (doppel make-tiny-model)"
        else:
            args.model = ensure_builtin("smollm2-135m")
            label = "SmolLM2-135M-Instruct (doppel base-model)"
        # SmolLM2 on CPU (no gradient checkpointing there): `doppel train`'s own default of 4 x 4 samples a
        # step; 16 samples of up to 800 tokens in one pass keep about 30 GB of activations for backward.
        real_on_cpu = label.startswith("SmolLM2") and args.device == "cpu"
        if args.steps is None:
            args.steps = 4 if real_on_cpu else 12
        if args.batch_size is None:
            args.batch_size = 4 if real_on_cpu else 16
        if args.grad_accum is None:
            args.grad_accum = 4 if real_on_cpu else 1
        if args.replies:
            replies_against_whole(args, label)
            return
        print(f"model: {label}; device {args.device}; LoRA rank {args.rank} on all projections")
        print(
            f"{args.steps} steps x {args.grad_accum} micro-batches of {args.batch_size}, "
            f"samples from {args.count} Slack-like threads"
        )
        ours = spawn(args, "ours")
        baseline = spawn(args, "baseline")
        for name, result in (("doppel train", ours), ("HF Trainer, pad-to-longest", baseline)):
            padding = result["padding"] / (result["tokens"] + result["padding"])
            print(
                f"{name:28s} {result['tokens_per_s']:10.0f} tokens/s  {result['tokens']:7d} tokens "
                f"in {result['seconds']:6.1f} s  padding {padding:5.1%}  "
                f"peak memory {result['peak_memory'] / 2**20:7.0f} MiB"
            )
        print(
            f"speed-up (tokens/s, doppel / baseline): {ours['tokens_per_s'] / baseline['tokens_per_s']:.2f}x"
        )
        from doppel.cpu import cpu_has_bf16

        if args.device == "cpu" and cpu_has_bf16():
            fp32 = spawn(args, "ours-float32")
            print(
                f"doppel train in float32: {fp32['tokens_per_s']:.0f} tokens/s; bfloat16 autocast (this CPU "
                f"has it natively) / float32: {ours['tokens_per_s'] / fp32['tokens_per_s']:.2f}x"
            )
        if args.device == "cuda":
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                params = AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(args.model)
                ).num_parameters()
            peak = matmul_flops(args.device)
            for name, result in (("doppel train", ours), ("baseline", baseline)):
                mfu = 4 * params * result["tokens_per_s"] / peak
                print(
                    f"MFU {name}: {mfu:.1%} (4 x {params / 1e9:.2f} B params x tokens/s "
                    f"vs {peak / 1e12:.0f} TFLOP/s bf16 matmul)"
                )


if __name__ == "__main__":
    main()
