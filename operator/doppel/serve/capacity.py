"""How many adapters a vLLM pod should hold: `--max-loras` (on the GPU, in one batch) and `--max-cpu-loras`
(in host memory, ready to swap in), from the number of doppels, the GPU's memory and the base model's shape.
Pure arithmetic; the chart's `vllm.maxLoras` / `vllm.maxCpuLoras` override it (docs: operating/capacity).

The formula (every input has a default the docs explain):

- vLLM reserves, for each of `--max-loras` slots, LoRA A and B matrices at `--max-lora-rank` for every
  linear layer it wraps (q, k, v, o, gate, up, down of every decoder layer), in the model's dtype:
  `slot = layers * max_rank * (7 h + 2 q + k + v + 3 i) * dtype_bytes` (h hidden, q/k/v the projections'
  output widths, i the MLP width). Those slots come out of the KV cache.
- The slots may take `lora_share` of what is left of `gpu_memory_utilization * GPU memory` after the
  weights: `fit = floor(lora_share * (util * gpu - weights) / slot)`.
- At once, about `concurrent_share` of the doppels are talked to (a batch holds at most `--max-loras`
  distinct adapters; requests for others wait for a slot): `busy = ceil(doppels * concurrent_share)`.
- `max_loras = clamp(min(busy, fit), 1, 256)`.
- Host memory keeps adapters as trained (the train Jobs' target modules at their rank) for quick swaps:
  `max_cpu_loras = max(max_loras, min(doppels, floor(cpu_budget / adapter)))`. An adapter outside both
  caches is read from the shared volume on its next request (the LoRA resolver): slower, never a failure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from doppel.errors import BadInput

GIB = 1024**3
# vLLM's cap on --max-loras that the chart schema also applies.
MAX_LORAS_CAP = 256
# What doppel's train Jobs adapt (doppel.train.trainer.DEFAULT_TARGET_MODULES; kept apart: serve does not
# import train).
TRAINED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that decide adapter sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = True
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: str | None = None) -> ModelShape:
        """From a Hugging Face `config.json` (Llama, Qwen2, Mistral and alike)."""
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                dtype_bytes=DTYPE_BYTES.get(dtype or str(config.get("torch_dtype") or "bfloat16"), 2),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"not a decoder config (missing or bad {exc}): cannot size adapters") from None

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each adaptable linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def weight_bytes(self) -> int:
        per_layer = sum(a * b for a, b in self.module_dims().values())
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return (self.layers * per_layer + embeddings) * self.dtype_bytes


def adapter_bytes(shape: ModelShape, rank: int, modules: Sequence[str] = TRAINED_MODULES) -> int:
    """One adapter in memory: A (rank x in) and B (out x rank) of each targeted module, every layer."""
    dims = shape.module_dims()
    unknown = sorted(set(modules) - dims.keys())
    if unknown:
        raise BadInput(f"cannot size adapters of modules {unknown}")
    return shape.layers * rank * sum(sum(dims[m]) for m in modules) * shape.dtype_bytes


def gpu_slot_bytes(shape: ModelShape, max_rank: int) -> int:
    """One `--max-loras` slot: vLLM wraps every linear layer, at the largest rank, whatever an adapter
    targets."""
    return adapter_bytes(shape, max_rank, tuple(shape.module_dims()))


@dataclass(frozen=True)
class Sizing:
    max_loras: int
    max_cpu_loras: int
    busy: int  # doppels expected in one batch window
    fit: int  # slots the GPU budget allows
    gpu_lora_bytes: int  # what the max_loras slots take on the GPU
    cpu_lora_bytes: int  # what max_cpu_loras adapters take in host memory

    def values(self) -> dict[str, int]:
        """As the chart takes them (`vllm.maxLoras`, `vllm.maxCpuLoras`)."""
        return {"maxLoras": self.max_loras, "maxCpuLoras": self.max_cpu_loras}


def size(
    doppels: int,
    gpu_memory_gib: float,
    shape: ModelShape,
    *,
    rank: int = 32,
    max_rank: int = 32,
    gpu_memory_utilization: float = 0.9,
    lora_share: float = 0.1,
    concurrent_share: float = 0.05,
    cpu_budget_gib: float = 8.0,
) -> Sizing:
    """The sizing of one vLLM pod serving `doppels` adapters of rank `rank` (see the module's formula)."""
    if doppels < 1 or gpu_memory_gib <= 0 or not 0 < gpu_memory_utilization <= 1 or rank > max_rank:
        raise BadInput("doppels >= 1, GPU memory > 0, utilization in (0, 1], rank <= max rank")
    free = gpu_memory_utilization * gpu_memory_gib * GIB - shape.weight_bytes()
    if free <= 0:
        raise BadInput(
            f"the base model's weights ({shape.weight_bytes() / GIB:.1f} GiB) do not fit in "
            f"{gpu_memory_utilization:.0%} of {gpu_memory_gib:g} GiB"
        )
    slot = gpu_slot_bytes(shape, max_rank)
    fit = math.floor(lora_share * free / slot)
    busy = math.ceil(doppels * concurrent_share)
    max_loras = max(1, min(busy, fit, MAX_LORAS_CAP))
    one = adapter_bytes(shape, rank)
    max_cpu_loras = max(max_loras, min(doppels, math.floor(cpu_budget_gib * GIB / one)))
    return Sizing(max_loras, max_cpu_loras, busy, fit, max_loras * slot, max_cpu_loras * one)
