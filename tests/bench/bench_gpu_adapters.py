"""Benchmark: many doppels' adapters on one GPU with a real-size base model (issue 28's GPU figures).

Nothing can be downloaded where the GPU is, so the base model is randomly initialised at a real model's
shape (Qwen2.5-1.5B-Instruct, the chart's default, and Qwen2.5-7B-Instruct, the capacity example in the
docs), in bfloat16, saved, and loaded by doppel's own in-process backend (`doppel.serve.local.LocalBackend`:
transformers + peft, what the train Job's fidelity report and `doppel local` serve with); the adapters are
random rank-32 LoRA on the 7 projections doppel trains. Speed and memory do not depend on what the weights
learned. Prints, per shape:

1. Adapter count: N adapters loaded one after another (wall time per load, p50/p95), the GPU memory each
   takes, and that against `doppel.serve.capacity.adapter_bytes` (the formula the chart's sizing uses),
   with what `capacity.size` then gives for 1,000 doppels on this GPU.
2. First reply of a doppel whose adapter is not loaded (read from the volume with the file dropped from the
   page cache, loaded, 8 greedy tokens) against a warm one (loaded, same 8 tokens), in pairs, medians; the
   ratio is the cold start a doppel's first mention pays on this backend.
3. One batch of 16 requests spread over 16 different adapters against the same 16 on one adapter and on
   the bare base model (tokens/s ratios): the cost of serving many doppels at once. PEFT routes a mixed batch
   row group by row group; vLLM's GPU build uses fused SGMV/BGMV kernels instead (not measured here: vLLM's
   CUDA build cannot be carried to the GPU machine).

Skips without a CUDA GPU, except `--shape tiny` (a few-MiB model on the CPU: checks the script itself).
Run: .venv/bin/python tests/bench/bench_gpu_adapters.py [--shape 1.5b 7b] [--adapters 48]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from doppel.serve.backend import BASE_ADAPTER, GenerationParams
from doppel.serve.capacity import TRAINED_MODULES, ModelShape, adapter_bytes, size
from doppel.serve.local import LocalBackend

MIB = 1024**2
RANK = 32
# Qwen2.5 shapes (their config.json, abridged to what sizes the model).
SHAPES: dict[str, dict[str, object]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GREEDY = GenerationParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=8)
QUESTION = [{"role": "user", "content": "Can you look at the flaky integration test on the release branch?"}]


def default_tokenizer() -> Path:
    """The built-in base model's tokenizer (SmolLM2's; a random model only needs ids within its vocab)."""
    from doppel.train.base_models import DEFAULT_MODEL, builtin_path

    return builtin_path(DEFAULT_MODEL)


def make_base(root: Path, shape: str, tokenizer: Path, device: str) -> Path:
    """A randomly initialised model of `shape`, saved as a model directory with a real tokenizer."""
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = root / f"qwen2.5-{shape}-random"
    model.save_pretrained(str(path))
    del model
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, path / name)
    return path


def write_adapter(path: Path, config: dict[str, object], seed: int) -> int:
    """A random rank-RANK adapter on TRAINED_MODULES in PEFT's layout; returns its bytes."""
    shape = ModelShape.from_config(config, "bfloat16")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for module, (fan_in, fan_out) in shape.module_dims().items():
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, fan_in, generator=generator) / 64).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (
                torch.randn(fan_out, RANK, generator=generator) / 64
            ).bfloat16()
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0,
        "target_modules": list(TRAINED_MODULES),
        "bias": "none",
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages, so the next read comes from the disk."""
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_bytes() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def measure(shape: str, adapters: int, tokenizer: Path, root: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    base = make_base(root, shape, tokenizer, device)
    config = json.loads((base / "config.json").read_text())
    made_s = time.monotonic() - started
    one = root / "adapters" / "a0000"
    file_bytes = write_adapter(one, config, seed=0)
    # The count test loads one adapter file under many names (memory and load time do not depend on the
    # values); the cold-start test below reads distinct files, dropped from the page cache.
    names = [f"doppel-{i:04d}" for i in range(adapters)]
    started = time.monotonic()
    backend = LocalBackend(base)
    sync()
    load_base_s = time.monotonic() - started
    weights_gib = gpu_bytes() / 1024**3
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"== Qwen2.5-{shape} shape, random bf16 on {where}: made in {made_s:.0f} s, loaded by LocalBackend "
        f"in {load_base_s:.1f} s ({weights_gib:.1f} GiB on the GPU)"
    )
    backend.complete(BASE_ADAPTER, QUESTION, GREEDY)  # warm the kernels

    before = gpu_bytes()
    loads = []
    for name in names:
        t = time.monotonic()
        backend.add_adapter(name, one)
        sync()
        loads.append(time.monotonic() - t)
    per_adapter = (gpu_bytes() - before) / adapters
    formula = adapter_bytes(ModelShape.from_config(config, "bfloat16"), RANK)
    print(
        f"1. {adapters} adapters (rank {RANK}, 7 projections, {file_bytes / MIB:.0f} MiB file) loaded in "
        f"{sum(loads):.1f} s: p50 {statistics.median(loads) * 1000:.0f} ms, p95 {p95(loads) * 1000:.0f} ms a "
        f"load; {per_adapter / MIB:.1f} MiB of GPU memory each, formula {formula / MIB:.1f} MiB "
        f"({per_adapter / formula:.3f}x)"
    )
    if device == "cuda":
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
        sizing = size(1000, gpu_gib, ModelShape.from_config(config, "bfloat16"))
        print(
            f"   capacity.size(1000 doppels, {gpu_gib:.0f} GiB): maxLoras {sizing.max_loras} "
            f"(GPU budget fits {sizing.fit}), maxCpuLoras {sizing.max_cpu_loras}"
        )

    cold, warm = [], []
    for i in range(5):
        path = root / "adapters" / f"cold-{i}"
        write_adapter(path, config, seed=100 + i)
        drop_from_page_cache(path)
        t = time.monotonic()
        backend.add_adapter(f"cold-{i}", path)
        backend.complete(f"cold-{i}", QUESTION, GREEDY)
        sync()
        cold.append(time.monotonic() - t)
        t = time.monotonic()
        backend.complete(f"cold-{i}", QUESTION, GREEDY)
        sync()
        warm.append(time.monotonic() - t)
    ratio = statistics.median(c / w for c, w in zip(cold, warm, strict=True))
    print(
        f"2. first reply (8 greedy tokens, median of 5 pairs) with {adapters} adapters loaded: adapter not "
        f"loaded (read from disk, loaded, answered) {statistics.median(cold) * 1000:.0f} ms, warm "
        f"{statistics.median(warm) * 1000:.0f} ms: cold/warm {ratio:.2f}x"
    )

    params = GREEDY.override(max_tokens=32)
    cases = {"base model": [BASE_ADAPTER] * 16, "one adapter": [names[0]] * 16, "16 adapters": names[:16]}
    rates: dict[str, float] = {}
    for label, batch in cases.items():
        backend.complete_batch([(a, QUESTION) for a in batch], params)  # warm this shape
        timings = []
        for _ in range(3):
            t = time.monotonic()
            replies = backend.complete_batch([(a, QUESTION) for a in batch], params)
            sync()
            timings.append(time.monotonic() - t)
        tokens = sum(len(backend.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
        rates[label] = tokens / statistics.median(timings)
    print(
        "3. one batch of 16 requests, 32 tokens each (tokens/s, median of 3): "
        + ", ".join(f"{label} {rate:.0f}" for label, rate in rates.items())
        + f"; 16 adapters / one adapter {rates['16 adapters'] / rates['one adapter']:.2f}x, "
        f"one adapter / base {rates['one adapter'] / rates['base model']:.2f}x"
    )
    del backend
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["1.5b", "7b"])
    parser.add_argument("--adapters", type=int, default=48)
    parser.add_argument("--tokenizer", type=Path, help="a model directory holding tokenizer.json")
    parser.add_argument("--workdir", type=Path, help="where the random models go (default: a temp dir)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.shape != ["tiny"]:
        print("skipped: no CUDA GPU here (run with --shape tiny to check the script on the CPU)")
        return
    tokenizer = args.tokenizer or default_tokenizer()
    if not (tokenizer / "tokenizer.json").is_file():
        sys.exit(f"no tokenizer.json in {tokenizer}: pass --tokenizer")
    for shape in args.shape:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.workdir) as tmp:
            measure(shape, args.adapters, tokenizer, Path(tmp))


if __name__ == "__main__":
    main()
