"""The vLLM client's pure parts (error bodies as vLLM 0.32 sends them, requests, SSE) and its retry loop."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from tests.support.http_stub import JsonHandler, serving

from doppel.errors import BadInput
from doppel.serve import errors
from doppel.serve.backend import DEFAULT_PARAMS, OPENING_TEMPERATURE, GenerationParams
from doppel.serve.vllm import VllmClient
from doppel.serve.vllm_protocol import (
    ModelCard,
    RetryPolicy,
    chat_body,
    error_from_body,
    opening_body,
    parse_chat,
    parse_opening,
    parse_sse_line,
    served_from,
)


def _body(message: str, kind: str, code: int) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def _worker_failed(cause: str) -> str:
    return (
        f"Call to add_lora method failed: Worker failed with error '{cause}', please check the stack trace "
        "above for the root cause"
    )


# Messages captured from the real vLLM 0.32 CPU server.
ALREADY = _body(
    "The lora adapter 'a' has already been loaded. If you want to load the adapter in place, set "
    "'load_inplace' to True.",
    "InvalidUserInput",
    400,
)
RANK = _body(_worker_failed("LoRA rank 64 is greater than max_lora_rank 32."), "InternalServerError", 500)
MISMATCH = _body(
    _worker_failed(
        "The size of tensor a (128) must match the size of tensor b (256) at non-singleton dimension 1"
    ),
    "InternalServerError",
    500,
)
NOT_FOUND = _body("Loading lora none failed: No adapter found for <path>", "NotFoundError", 404)
NO_MODEL = _body("The model `zzz` does not exist. Valid aliases: doppel-tiny.", "NotFoundError", 404)
TOO_LONG = _body("max_tokens=1024 cannot be greater than max_model_len=512.", "BadRequestError", 400)
ENGINE_DEAD = _body("EngineCore encountered an issue.", "InternalServerError", 500)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, ALREADY, errors.AdapterAlreadyLoaded),
        (500, RANK, errors.AdapterRankTooLarge),
        (500, MISMATCH, errors.BaseModelMismatch),
        (404, NOT_FOUND, errors.AdapterNotFound),
        (404, NO_MODEL, errors.UnknownModel),
        (400, TOO_LONG, errors.RequestRejected),
        (500, ENGINE_DEAD, errors.ServerUnavailable),
        (502, "<html>Bad Gateway</html>", errors.ServerUnavailable),
    ],
)
def test_error_bodies_map_to_typed_errors(status, body, expected):
    error = error_from_body(status, body)
    assert type(error) is expected
    assert "\n" not in str(error)
    assert error.status == status


def test_the_older_flat_error_shape_is_parsed_too():
    body = json.dumps(
        {
            "object": "error",
            "message": "LoRA rank 64 is greater than max_lora_rank 16.",
            "type": "BadRequestError",
            "code": 400,
        }
    )
    error = error_from_body(400, body)
    assert isinstance(error, errors.AdapterRankTooLarge)
    assert str(error) == "LoRA rank 64 is greater than max_lora_rank 16."
    assert error.kind == "BadRequestError"


def test_adapter_errors_are_bad_input_but_an_unavailable_server_is_not():
    # The CLI exits 2 and the operator gives up on BadInput; a server that is down is worth retrying.
    assert isinstance(error_from_body(500, RANK), BadInput)
    assert isinstance(error_from_body(404, NOT_FOUND), BadInput)
    assert not isinstance(error_from_body(503, "overloaded"), BadInput)


def test_wrapped_worker_errors_keep_only_the_cause():
    assert str(error_from_body(500, RANK)) == "LoRA rank 64 is greater than max_lora_rank 32."


def test_chat_body_carries_doppelbot_defaults():
    body = chat_body("pat-v1", [{"role": "user", "content": "hi"}], DEFAULT_PARAMS, stream=True)
    assert body["model"] == "pat-v1"
    assert body["stream"] is True
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.2, 0.95, 50)
    assert (body["repetition_penalty"], body["max_tokens"]) == (1.1, 1024)
    assert "seed" not in body


def test_params_override_and_context_cap():
    params = DEFAULT_PARAMS.override(temperature=0.0, seed=7, max_tokens=None)
    assert params == GenerationParams(temperature=0.0, seed=7, opening_temperature=OPENING_TEMPERATURE)
    body = chat_body("m", [], params, stream=False, context=512)
    # vLLM rejects max_tokens above its context length; it stops by itself where the context is full.
    assert body["max_tokens"] == 512
    assert body["seed"] == 7


def test_a_sampled_opening_is_a_request_of_its_own_that_the_reply_continues():
    messages = [
        {"role": "system", "content": "You are Pat Doe, chatting."},
        {"role": "user", "content": "Bo: hi"},
    ]
    opening = opening_body("pat-v1", messages, DEFAULT_PARAMS, context=512)
    assert opening is not None
    assert (opening["temperature"], opening["max_tokens"]) == (OPENING_TEMPERATURE, 1)
    assert opening["stream"] is False and opening["messages"] == messages
    assert opening["bad_words"] == ["@Pat Doe", "Pat Doe:", "@Pat", "Pat:"]
    # Without a sampled opening (one temperature throughout, or an opening no hotter than the rest): none.
    assert opening_body("pat-v1", messages, GenerationParams(temperature=0.0)) is None
    assert opening_body("pat-v1", messages, DEFAULT_PARAMS.override(opening_temperature=0.1)) is None

    body = chat_body("pat-v1", messages, DEFAULT_PARAMS, stream=True, context=512, opening="Sure")
    assert body["messages"] == [*messages, {"role": "assistant", "content": "Sure"}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert (body["temperature"], body["max_tokens"]) == (0.2, 511)
    reply = {"choices": [{"message": {"content": ", on it."}, "finish_reason": "stop"}]}
    assert parse_chat(reply, messages, "Sure") == "Sure, on it."


def test_an_opening_that_ended_the_reply_or_cut_a_character_is_not_continued():
    def first(text: str, reason: str) -> dict:
        return {"choices": [{"message": {"content": text}, "finish_reason": reason}]}

    assert parse_opening(first("Sure", "length")) == "Sure"
    assert parse_opening(first("", "stop")) == ""  # the reply ended at once: it is asked for whole
    assert parse_opening(first("\ufffd", "length")) == ""  # a byte of a character: text cannot carry it


def test_sse_lines():
    chunk = {"choices": [{"index": 0, "delta": {"content": "Yarr"}, "finish_reason": None}]}
    assert parse_sse_line("data: " + json.dumps(chunk)) == "Yarr"
    assert parse_sse_line('data: {"choices":[{"delta":{"role":"assistant","content":""}}]}') == ""
    assert parse_sse_line(": keep-alive") == ""
    assert parse_sse_line("data: [DONE]") is None
    with pytest.raises(errors.RequestRejected):
        parse_sse_line('data: {"error":{"message":"bad things","type":"BadRequestError","code":400}}')


def test_served_from_finds_adapters_only():
    cards = [
        ModelCard("doppel-tiny", "/models/tiny", None, 512),
        ModelCard("pat-v1", "/adapters/pat/v1", "doppel-tiny"),
    ]
    assert served_from(cards, "pat-v1") == "/adapters/pat/v1"
    assert served_from(cards, "doppel-tiny") is None
    assert served_from(cards, "ana-v1") is None


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(attempts=6, initial_delay=0.5, max_delay=2.0)
    assert [policy.delay(i) for i in range(4)] == [0.5, 1.0, 2.0, 2.0]


class _Flaky(JsonHandler):
    """Answers /v1/models with 503 a set number of times, then with a model list."""

    failures_left = 0
    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self._json(503, {"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}})
        else:
            self._json(200, {"object": "list", "data": [{"id": "doppel-tiny", "root": "/m", "parent": None}]})


@pytest.fixture
def flaky_server() -> Iterator[str]:
    _Flaky.calls = 0
    with serving(_Flaky) as url:
        yield url


def test_5xx_is_retried_until_it_succeeds(flaky_server):
    _Flaky.failures_left = 2
    with VllmClient(flaky_server, retry=RetryPolicy(attempts=3, initial_delay=0.01)) as client:
        assert [c.id for c in client.list_models()] == ["doppel-tiny"]
    assert _Flaky.calls == 3


def test_5xx_that_persists_raises_server_unavailable(flaky_server):
    _Flaky.failures_left = 10
    with (
        VllmClient(flaky_server, retry=RetryPolicy(attempts=3, initial_delay=0.01)) as client,
        pytest.raises(errors.ServerUnavailable, match="overloaded"),
    ):
        client.list_models()
    assert _Flaky.calls == 3


def test_unreachable_server_is_retried_then_reported():
    from tests.support.vllm_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with (
        VllmClient(url, retry=RetryPolicy(attempts=2, initial_delay=0.01)) as client,
        pytest.raises(errors.ServerUnavailable, match="unreachable"),
    ):
        client.list_models()
