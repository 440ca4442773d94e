"""The in-process backend: transformers + peft with several adapters of the tiny model in one batch."""

from __future__ import annotations

import json

import pytest
from tests.support.model_fixtures import STYLE_MARKER
from tests.support.vllm_fixtures import ROBOT_MARKER

from doppel.cpu import cpu_has_bf16
from doppel.serve import errors
from doppel.serve.backend import BASE_ADAPTER, OPENING_TEMPERATURE, GenerationParams
from doppel.serve.local import LocalBackend

GREEDY = GenerationParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def backend(tiny_model, trained_adapter, robot_adapter) -> LocalBackend:
    return LocalBackend(tiny_model, {"pat": trained_adapter, "robot": robot_adapter})


def test_one_batch_mixes_adapters_and_the_base(backend, heldout_messages):
    assert backend.adapters == ["pat", "robot"]
    pat, robot, base = backend.complete_batch(
        [("pat", heldout_messages), ("robot", heldout_messages), (BASE_ADAPTER, heldout_messages)], GREEDY
    )
    assert STYLE_MARKER in pat and ROBOT_MARKER not in pat
    assert ROBOT_MARKER in robot and STYLE_MARKER not in robot
    assert STYLE_MARKER not in base and ROBOT_MARKER not in base


def test_streaming_yields_the_reply_piece_by_piece(backend, heldout_messages):
    pieces = list(backend.stream("robot", heldout_messages, GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == backend.complete("robot", heldout_messages, GREEDY)


def test_sampling_with_a_seed_repeats(backend, heldout_messages):
    params = GenerationParams(temperature=1.0, max_tokens=20, seed=3)
    assert backend.complete(BASE_ADAPTER, heldout_messages, params) == backend.complete(
        BASE_ADAPTER, heldout_messages, params
    )


def test_a_sampled_opening_varies_the_first_token_alone_and_repeats_with_its_seed(backend, heldout_messages):
    def opened(seed: int) -> GenerationParams:
        return GenerationParams(
            temperature=0.0, max_tokens=12, seed=seed, opening_temperature=OPENING_TEMPERATURE
        )

    greedy = GenerationParams(temperature=0.0, max_tokens=12)
    plain = backend.complete(BASE_ADAPTER, heldout_messages, greedy)
    tokens = backend.tokenizer
    replies = [backend.complete(BASE_ADAPTER, heldout_messages, opened(seed)) for seed in range(8)]
    openings = {tokens(r, add_special_tokens=False)["input_ids"][0] for r in replies}
    assert len(openings) > 1, replies  # greedy opens every reply the same way; sampled, they differ
    assert backend.complete(BASE_ADAPTER, heldout_messages, opened(5)) == replies[5]
    assert "".join(backend.stream(BASE_ADAPTER, heldout_messages, opened(5))) == replies[5]
    # After the opening the reply is greedy: a reply that opens as the greedy one does goes on as it does.
    first = tokens(plain, add_special_tokens=False)["input_ids"][0]
    same = [r for r in replies if tokens(r, add_special_tokens=False)["input_ids"][0] == first]
    assert all(r == plain for r in same)


def test_unknown_and_bad_adapters_are_refused(backend, heldout_messages, foreign_adapter, tmp_path):
    with pytest.raises(errors.UnknownModel, match="'ana'"):
        backend.complete("ana", heldout_messages, GREEDY)
    with pytest.raises(errors.UnknownModel):
        list(backend.stream("ana", heldout_messages, GREEDY))
    with pytest.raises(errors.AdapterNotFound, match=r"adapter_config\.json"):
        backend.add_adapter("nothing", tmp_path)
    with pytest.raises(errors.BaseModelMismatch, match="does not fit"):
        backend.add_adapter("foreign", foreign_adapter)
    assert backend.adapters == ["pat", "robot"]


def test_removed_adapter_no_longer_answers(tiny_model, trained_adapter, heldout_messages):
    backend = LocalBackend(tiny_model, {"pat": trained_adapter})
    backend.remove_adapter("pat")
    with pytest.raises(errors.UnknownModel):
        backend.complete("pat", heldout_messages, GREEDY)


def test_missing_base_model_is_refused(tmp_path):
    with pytest.raises(errors.UnknownModel, match=r"config\.json"):
        LocalBackend(tmp_path / "nothing-here")


@pytest.mark.parametrize("bf16", [True, False])
def test_each_adapter_keeps_its_voice_in_bfloat16_autocast_and_in_float32(
    tiny_model, trained_adapter, robot_adapter, heldout_messages, bf16
):
    backend = LocalBackend(tiny_model, {"pat": trained_adapter, "robot": robot_adapter}, bf16=bf16)
    assert backend.bf16 is bf16
    pat, robot = backend.complete_batch([("pat", heldout_messages), ("robot", heldout_messages)], GREEDY)
    assert STYLE_MARKER in pat and ROBOT_MARKER in robot
    assert "".join(backend.stream("robot", heldout_messages, GREEDY)) == robot


def test_bfloat16_autocast_is_on_where_the_cpu_computes_it(tiny_model):
    assert LocalBackend(tiny_model).bf16 is cpu_has_bf16()


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(temperature=0.0, max_tokens=16, seed=5, opening_temperature=OPENING_TEMPERATURE),
        GenerationParams(temperature=1.0, max_tokens=16, seed=3),
    ],
    ids=["sampled-opening", "sampled-throughout"],
)
def test_a_seeded_reply_is_the_same_alone_and_whatever_its_batch_mates(
    tiny_model, trained_adapter, robot_adapter, style_samples, heldout_messages, params
):
    # float32: bfloat16 autocast rounds a padded row's logits otherwise than an unpadded one's, and this is
    # about the draws, not the floats.
    backend = LocalBackend(tiny_model, {"pat": trained_adapter, "robot": robot_adapter}, bf16=False)
    lines = style_samples.heldout.read_text(encoding="utf-8").splitlines()
    others = [json.loads(line)["messages"][:-1] for line in lines[1:5]]
    assert len(others) == 4 and heldout_messages not in others
    alone = backend.complete(BASE_ADAPTER, heldout_messages, params)
    first = backend.complete_batch(
        [("robot", others[0]), (BASE_ADAPTER, heldout_messages), (BASE_ADAPTER, others[1])], params
    )
    second = backend.complete_batch(
        [(BASE_ADAPTER, others[2]), ("pat", others[3]), (BASE_ADAPTER, heldout_messages)], params
    )
    assert first[1] == second[2] == alone
    assert "".join(backend.stream(BASE_ADAPTER, heldout_messages, params)) == alone
    # The batch-mates' own replies are their own too: each as it is alone.
    assert first[0] == backend.complete("robot", others[0], params)
    assert second[0] == backend.complete(BASE_ADAPTER, others[2], params)
    # Another seed draws otherwise (the seed still counts).
    assert backend.complete(BASE_ADAPTER, heldout_messages, params.override(seed=params.seed + 1)) != alone
