"""The vLLM client against the real vLLM CPU server serving the tiny model and adapters trained on it."""

from __future__ import annotations

import threading
import time

import pytest
from tests.support.model_fixtures import STYLE_MARKER
from tests.support.reply_cut import ReplyCutProxy
from tests.support.vllm_fixtures import ROBOT_MARKER

from doppel.serve import errors
from doppel.serve.backend import BASE_ADAPTER, OPENING_TEMPERATURE, GenerationParams
from doppel.serve.local import LocalBackend
from doppel.serve.vllm import AsyncVllmClient, VllmBackend, VllmClient
from doppel.serve.vllm_protocol import LoadOutcome, RetryPolicy

pytestmark = pytest.mark.vllm

GREEDY = GenerationParams(temperature=0.0, max_tokens=40)


@pytest.fixture
def client(vllm_server):
    with VllmClient(vllm_server.base_url) as client:
        yield client


def _served(client: VllmClient) -> dict[str, str | None]:
    return {card.id: card.root for card in client.list_models()}


def test_two_adapters_and_the_base_answer_in_their_own_styles(
    client, trained_adapter, robot_adapter, heldout_messages
):
    assert client.load_adapter("pat-v1", str(trained_adapter)) is LoadOutcome.LOADED
    assert client.load_adapter("robot-v1", str(robot_adapter)) is LoadOutcome.LOADED
    served = _served(client)
    assert served["pat-v1"] == str(trained_adapter)
    assert served["robot-v1"] == str(robot_adapter)

    backend = VllmBackend(client)
    pat = backend.complete("pat-v1", heldout_messages, GREEDY)
    robot = backend.complete("robot-v1", heldout_messages, GREEDY)
    base = backend.complete(BASE_ADAPTER, heldout_messages, GREEDY)
    assert STYLE_MARKER in pat and ROBOT_MARKER not in pat
    assert ROBOT_MARKER in robot and STYLE_MARKER not in robot
    assert STYLE_MARKER not in base and ROBOT_MARKER not in base

    # Streaming delivers the same greedy reply, in several pieces.
    pieces = list(backend.stream("pat-v1", heldout_messages, GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == pat

    client.unload_adapter("pat-v1")
    client.unload_adapter("robot-v1")
    assert "pat-v1" not in _served(client)


def _opened(seed: int) -> GenerationParams:
    return GenerationParams(
        temperature=0.0, max_tokens=12, seed=seed, opening_temperature=OPENING_TEMPERATURE
    )


async def test_a_sampled_opening_varies_the_first_token_alone_and_repeats_with_its_seed(
    client, vllm_server, heldout_messages
):
    backend = VllmBackend(client)
    plain = backend.complete(BASE_ADAPTER, heldout_messages, GenerationParams(temperature=0.0, max_tokens=12))
    replies = [backend.complete(BASE_ADAPTER, heldout_messages, _opened(seed)) for seed in range(8)]
    model = backend.model_name(BASE_ADAPTER)
    first = [
        client.tokenize_chat(model, [*heldout_messages, {"role": "assistant", "content": r}]) for r in replies
    ]
    prompt = len(client.tokenize_chat(model, heldout_messages))
    assert len({ids[prompt] for ids in first}) > 1, replies  # greedy opens every reply alike; sampled, not
    assert backend.complete(BASE_ADAPTER, heldout_messages, _opened(5)) == replies[5]
    assert "".join(backend.stream(BASE_ADAPTER, heldout_messages, _opened(5))) == replies[5]
    # After its opening the reply is greedy: one that opens as the greedy reply does goes on as it does.
    assert all(r == plain for r in replies if r.split()[:1] == plain.split()[:1])
    async with AsyncVllmClient(vllm_server.base_url) as aclient:
        assert await aclient.chat(model, heldout_messages, _opened(5)) == replies[5]
        assert (
            "".join([p async for p in aclient.stream_chat(model, heldout_messages, _opened(5))]) == replies[5]
        )


async def test_async_client_streams_and_loads_idempotently(vllm_server, robot_adapter, heldout_messages):
    async with AsyncVllmClient(vllm_server.base_url) as client:
        assert await client.load_adapter("robot-async", str(robot_adapter)) is LoadOutcome.LOADED
        assert await client.load_adapter("robot-async", str(robot_adapter)) is LoadOutcome.UNCHANGED
        pieces = [p async for p in client.stream_chat("robot-async", heldout_messages, GREEDY)]
        assert ROBOT_MARKER in "".join(pieces)
        assert await client.chat("robot-async", heldout_messages, GREEDY) == "".join(pieces)
        assert await client.unload_adapter("robot-async")
        assert not await client.unload_adapter("robot-async", missing_ok=True)


def test_reloading_a_name_is_idempotent_and_a_new_path_replaces_the_weights(
    client, trained_adapter, robot_adapter, heldout_messages
):
    assert client.load_adapter("alice", str(trained_adapter)) is LoadOutcome.LOADED
    assert client.load_adapter("alice", str(trained_adapter)) is LoadOutcome.UNCHANGED
    assert STYLE_MARKER in client.chat("alice", heldout_messages, GREEDY)

    # A retrained version at a new path, under the same name: requests never find the name missing while
    # it is swapped, and afterwards it answers with the new weights.
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def keep_asking() -> None:
        nonlocal answered
        with VllmClient(client.base_url) as other:
            while not stop.is_set():
                try:
                    other.chat("alice", heldout_messages, GREEDY.override(max_tokens=2))
                    answered += 1
                except errors.ServeError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        time.sleep(0.5)
        assert client.load_adapter("alice", str(robot_adapter)) is LoadOutcome.REPLACED
        time.sleep(0.5)
    finally:
        stop.set()
        asker.join()
    assert failures == []
    assert answered > 0
    assert _served(client)["alice"] == str(robot_adapter)
    reply = client.chat("alice", heldout_messages, GREEDY)
    assert ROBOT_MARKER in reply and STYLE_MARKER not in reply
    client.unload_adapter("alice")


def test_unloaded_adapter_is_gone(client, trained_adapter, heldout_messages):
    client.load_adapter("gone", str(trained_adapter))
    assert client.unload_adapter("gone")
    assert "gone" not in _served(client)
    with pytest.raises(errors.UnknownModel, match="does not exist"):
        client.chat("gone", heldout_messages, GREEDY)
    with pytest.raises(errors.UnknownModel, match="cannot be found"):
        client.unload_adapter("gone")
    assert client.unload_adapter("gone", missing_ok=True) is False


def test_bad_adapters_are_rejected_with_clear_errors(client, rank64_adapter, foreign_adapter, tmp_path):
    cases = [
        ("big", rank64_adapter, errors.AdapterRankTooLarge, "greater than max_lora_rank 32"),
        ("foreign", foreign_adapter, errors.BaseModelMismatch, "size of tensor"),
        ("nowhere", tmp_path / "no-such-dir", errors.AdapterNotFound, "No adapter found"),
        ("empty", tmp_path, errors.AdapterNotFound, "No adapter found"),
    ]
    for name, path, error_type, fragment in cases:
        with pytest.raises(error_type) as caught:
            client.load_adapter(name, str(path))
        message = str(caught.value)
        assert fragment in message
        assert str(path) in message and name in message
        assert "\n" not in message
        assert name not in _served(client)
    with pytest.raises(errors.RequestRejected, match="conflicts with a served base model"):
        client.load_adapter(client.base_model().id, str(rank64_adapter))
    # The server is still healthy and serving.
    assert client.chat(client.base_model().id, [{"role": "user", "content": "hi"}], GREEDY)


def test_vllm_renders_the_same_prompt_as_the_local_backend(client, tiny_model, heldout_messages):
    local = LocalBackend(tiny_model)
    served_tokens = client.tokenize_chat(client.base_model().id, heldout_messages)
    assert served_tokens == local.prompt_token_ids(heldout_messages)
    assert client.detokenize(client.base_model().id, served_tokens) == local.render_prompt(heldout_messages)


def test_server_killed_mid_reply_then_restarted_and_reregistered(
    vllm_server, trained_adapter, heldout_messages
):
    # The reply goes through a proxy that passes its first piece of text and holds the rest, as a server
    # that dies right after it began to answer would: the tiny model writes a whole reply faster than a
    # loaded test process reads on, so a plain kill after the first piece often came after [DONE].
    fast_fail = RetryPolicy(attempts=2, initial_delay=0.1)
    with VllmClient(vllm_server.base_url, retry=fast_fail) as client:
        client.load_adapter("pat-restart", str(trained_adapter))
    proxy = ReplyCutProxy(vllm_server.port).start()
    try:
        with VllmClient(proxy.url, retry=fast_fail) as through_proxy:
            long_reply = GenerationParams(temperature=1.0, repetition_penalty=1.0, max_tokens=400)
            stream = through_proxy.stream_chat(
                through_proxy.base_model().id, heldout_messages[-1:], long_reply
            )
            assert next(stream)
            assert proxy.cuts == 1
            vllm_server.kill()
            with pytest.raises(errors.ServerUnavailable, match=r"mid-reply|ended the reply"):
                for _ in stream:
                    pass
    finally:
        proxy.stop()
    with VllmClient(vllm_server.base_url, retry=fast_fail) as client:
        with pytest.raises(errors.ServerUnavailable, match="unreachable"):
            client.chat("pat-restart", heldout_messages, GREEDY)

        vllm_server.start()
        # A new process has no adapters: the name must be registered again.
        assert "pat-restart" not in _served(client)
        with pytest.raises(errors.UnknownModel):
            client.chat("pat-restart", heldout_messages, GREEDY)
        assert client.load_adapter("pat-restart", str(trained_adapter)) is LoadOutcome.LOADED
        assert STYLE_MARKER in client.chat("pat-restart", heldout_messages, GREEDY)
        client.unload_adapter("pat-restart")
