"""Adapter capacity sizing (`doppel.serve.capacity`): the documented formula, by hand."""

from __future__ import annotations

import pytest

from doppel.errors import BadInput
from doppel.serve.capacity import GIB, ModelShape, adapter_bytes, gpu_slot_bytes, size

# Qwen2.5-7B-Instruct's config.json (the scaled example's model), bf16.
QWEN_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_a_slot_and_an_adapter_by_hand():
    shape = ModelShape.from_config(QWEN_7B)
    assert shape.head_dim == 128 and shape.dtype_bytes == 2
    # q, k, v, o, gate, up, down: (in + out) each; k and v are 4 heads x 128 wide.
    per_rank = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584)
    assert gpu_slot_bytes(shape, 32) == 28 * 32 * per_rank * 2
    assert adapter_bytes(shape, 16, ("q_proj", "v_proj")) == 28 * 16 * ((3584 + 3584) + (3584 + 512)) * 2


def test_one_h100_and_a_thousand_doppels():
    shape = ModelShape.from_config(QWEN_7B)
    sizing = size(1000, 80, shape)
    slot = gpu_slot_bytes(shape, 32)
    free = 0.9 * 80 * GIB - shape.weight_bytes()
    assert 14 * GIB < shape.weight_bytes() < 15 * GIB  # 7.6 B parameters in bf16
    assert sizing.fit == int(0.1 * free // slot) == 38
    assert sizing.busy == 50  # 5 % of 1,000 talked to at once
    assert sizing.max_loras == 38  # the GPU budget is the limit
    assert sizing.max_cpu_loras == int(8 * GIB // adapter_bytes(shape, 32)) == 53
    assert sizing.values() == {"maxLoras": 38, "maxCpuLoras": 53}


def test_few_doppels_need_few_slots_and_all_fit_in_host_memory():
    sizing = size(12, 80, ModelShape.from_config(QWEN_7B))
    assert (sizing.busy, sizing.max_loras, sizing.max_cpu_loras) == (1, 1, 12)


def test_impossible_inputs_are_bad_input():
    shape = ModelShape.from_config(QWEN_7B)
    with pytest.raises(BadInput, match="do not fit"):
        size(10, 8, shape)
    with pytest.raises(BadInput):
        size(10, 80, shape, rank=64, max_rank=32)
    with pytest.raises(BadInput, match="not a decoder config"):
        ModelShape.from_config({"hidden_size": 8})
