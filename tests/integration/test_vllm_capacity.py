"""More doppels than a vLLM pod holds in memory: adapters come from the volume when asked for, and adapters
pushed out of memory come back, without a failed reply.

The real vLLM CPU server, started as the chart starts it (LoRA resolver on the volume's lora/ directory)
but holding one adapter on the "GPU" and one in host memory (--max-loras 1 --max-cpu-loras 1), serves three
adapters of the tiny model in turn. Replies are greedy: an adapter that came back must answer as it did
before it was evicted (and the three, with random weights, answer differently).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.vllm_fixtures import VllmServer, vllm_python

from doppel.serve.backend import GenerationParams
from doppel.serve.vllm import VllmClient

pytestmark = pytest.mark.vllm

GREEDY = GenerationParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=8)
QUESTION = [{"role": "user", "content": "when is the deploy?"}]


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three rank-8 adapters of the tiny model with random (distinct) weights, as train Jobs leave them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        path = tmp_path_factory.mktemp("adapters") / f"v{seed}"
        get_peft_model(model, config).save_pretrained(str(path))
        out.append(path)
    return out


@pytest.fixture(scope="module")
def small_pool(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmServer, Path]]:
    volume = tmp_path_factory.mktemp("volume")
    (volume / "lora").mkdir()
    env = {"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(volume / "lora")}
    server = VllmServer(
        tiny_model,
        tmp_path_factory.mktemp("vllm-small") / "vllm.log",
        python=vllm_python(),
        extra_args=["--max-loras", "1", "--max-cpu-loras", "1"],  # the later flags win
        extra_env=env,
    )
    server.start()
    try:
        yield server, volume / "lora"
    finally:
        server.stop()


def test_adapters_never_registered_load_from_the_volume_and_come_back_after_eviction(small_pool, adapters):
    server, lora_dir = small_pool
    names = [f"cap-resolved-{i}" for i in range(3)]
    for name, path in zip(names, adapters, strict=True):
        (lora_dir / name).symlink_to(path)  # what a train Job leaves (never loaded through the API)
    with VllmClient(server.base_url) as client:
        first = {name: client.chat(name, QUESTION, GREEDY) for name in names}
        again = {name: client.chat(name, QUESTION, GREEDY) for name in reversed(names)}
        served = {card.id for card in client.list_models()}
    assert again == first  # each came back, and as itself
    assert len(set(first.values())) > 1  # different adapters, different answers: the right one answered
    assert set(names) <= served


def test_registered_adapters_beyond_the_cache_all_answer(small_pool, adapters):
    server, _ = small_pool
    names = [f"cap-loaded-{i}" for i in range(3)]
    with VllmClient(server.base_url) as client:
        for name, path in zip(names, adapters, strict=True):
            client.load_adapter(name, str(path))  # what the operator does on every pod
        replies = [client.chat(name, QUESTION, GREEDY) for name in [*names, *names]]
    assert replies[:3] == replies[3:]
    assert all(reply is not None for reply in replies)
