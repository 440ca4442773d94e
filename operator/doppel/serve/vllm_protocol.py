"""vLLM's OpenAI-compatible HTTP API as data: paths, request bodies, response parsing, the typed error for
an error body, and the retry policy. Pure, no I/O; the sync and async clients in vllm.py share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from doppel.serve.addressing import Addressing
from doppel.serve.backend import GenerationParams, Messages
from doppel.serve.errors import (
    AdapterAlreadyLoaded,
    AdapterNotFound,
    AdapterRankTooLarge,
    BaseModelMismatch,
    InvalidAdapter,
    RequestRejected,
    ServeError,
    ServerUnavailable,
    UnknownModel,
)

MODELS_PATH = "/v1/models"
LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
CHAT_PATH = "/v1/chat/completions"
TOKENIZE_PATH = "/tokenize"
DETOKENIZE_PATH = "/detokenize"

# Generation on CPU is slow: allow a long read, but notice a dead server quickly.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=30.0)

# Message fragments of vLLM's errors, mapped to the error the caller can act on. Checked in order.
_ERROR_PATTERNS: tuple[tuple[str, type[ServeError]], ...] = (
    ("has already been loaded", AdapterAlreadyLoaded),
    ("max_lora_rank", AdapterRankTooLarge),
    ("no adapter found for", AdapterNotFound),
    ("expected target modules", BaseModelMismatch),
    ("base model's vocabulary size", BaseModelMismatch),
    ("size of tensor", BaseModelMismatch),
    ("shape", BaseModelMismatch),
    ("missing required configuration fields", InvalidAdapter),
    ("adapter_config", InvalidAdapter),
    ("doesn't contain tensors", InvalidAdapter),
    ("unsupported lora weight", InvalidAdapter),
    ("is not supported", InvalidAdapter),
    ("safetensors", InvalidAdapter),
    ("does not exist", UnknownModel),
    ("cannot be found", UnknownModel),
)


class LoadOutcome(StrEnum):
    LOADED = "loaded"  # the name was new
    UNCHANGED = "unchanged"  # already served from the same path
    REPLACED = "replaced"  # served from another path before; swapped in place


@dataclass(frozen=True)
class ModelCard:
    """One entry of /v1/models: the base model (no parent) or a LoRA adapter (parent = base)."""

    id: str
    root: str | None
    parent: str | None
    max_model_len: int | None = None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of connection errors and 5xx, with exponential backoff."""

    attempts: int = 4
    initial_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.initial_delay * 2**attempt)


DEFAULT_RETRY = RetryPolicy()


def error_from_body(status: int | None, body: str) -> ServeError:
    """The typed error for a vLLM error body, in either shape vLLM has used:
    `{"object": "error", "message", "type", "code"}` (older) or `{"error": {"message", "type", "code"}}`."""
    message, kind = body.strip() or f"HTTP {status}", None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        detail = data["error"] if isinstance(data.get("error"), dict) else data
        message = str(detail.get("message") or message)
        kind = detail.get("type")
        if status is None and isinstance(detail.get("code"), int):
            status = detail["code"]
    # Adapter failures come wrapped as "Call to add_lora method failed: Worker failed with error '<cause>',
    # please check the stack trace above...": the cause is what the user needs.
    match = re.search(r"Worker failed with error '(.*)'", message)
    if match:
        message = match.group(1)
    lowered = message.lower()
    for fragment, error_type in _ERROR_PATTERNS:
        if fragment in lowered:
            return error_type(message, status=status, kind=kind)
    if status is not None and 400 <= status < 500:
        return RequestRejected(message, status=status, kind=kind)
    return ServerUnavailable(f"vLLM failed (HTTP {status}): {message}", status=status, kind=kind)


def load_body(name: str, path: str, *, inplace: bool = False) -> dict[str, Any]:
    return {"lora_name": name, "lora_path": path, "load_inplace": inplace}


def chat_body(
    model: str,
    messages: Messages,
    params: GenerationParams,
    *,
    stream: bool,
    context: int | None = None,
    opening: str = "",
) -> dict[str, Any]:
    """The chat completion request; `max_tokens` is capped at the server's context length `context`,
    which vLLM otherwise rejects (it stops by itself where prompt + reply fill the context). With an
    `opening` (see `opening_body`), the request continues a reply that starts with it."""
    max_tokens = min(params.max_tokens, context) if context else params.max_tokens
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "temperature": params.temperature,
        "top_p": params.top_p,
        # top_k and repetition_penalty are vLLM's extensions of the OpenAI request.
        "top_k": params.top_k,
        "repetition_penalty": params.repetition_penalty,
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if opening:
        # vLLM's extension: the last (assistant) message is the start of the reply, continued, not closed.
        body["messages"].append({"role": "assistant", "content": opening})
        body.update(continue_final_message=True, add_generation_prompt=False)
        body["max_tokens"] = max(1, max_tokens - 1)
    if params.seed is not None:
        body["seed"] = params.seed
    banned = Addressing.of(messages).banned_words()
    if banned:  # vLLM's extension: never generated (it tries them with and without a leading space)
        body["bad_words"] = banned
    return body


def opening_body(
    model: str, messages: Messages, params: GenerationParams, *, context: int | None = None
) -> dict[str, Any] | None:
    """The request for the reply's first token alone, at `params.opening_temperature`; None when the
    opening is not sampled apart. vLLM's OpenAI API has one temperature a request, so a sampled opening is
    its own request, and the reply continues it (`chat_body(opening=...)`; the prefix cache makes the second
    prompt's prefill nearly free)."""
    if not params.samples_opening:
        return None
    first = dataclasses.replace(params, temperature=params.opening_temperature, max_tokens=1)
    return chat_body(model, messages, first, stream=False, context=context)


def parse_opening(data: dict[str, Any]) -> str:
    """The sampled first token's text; "" when the reply should be generated whole instead: it ended at
    once, or its first token is part of a character (a byte of UTF-8 that text cannot carry back)."""
    choice = data["choices"][0]
    text = str(choice["message"].get("content") or "")
    if choice.get("finish_reason") != "length" or "\ufffd" in text:
        return ""
    return text


def parse_models(data: dict[str, Any]) -> list[ModelCard]:
    return [
        ModelCard(
            id=m["id"], root=m.get("root"), parent=m.get("parent"), max_model_len=m.get("max_model_len")
        )
        for m in data.get("data", [])
    ]


def parse_chat(data: dict[str, Any], messages: Messages = (), opening: str = "") -> str:
    """The reply's text (after `opening`, when it continued one), its opening addressee repaired for
    `messages` (`Addressing.repair`)."""
    return Addressing.of(messages).repair(opening + str(data["choices"][0]["message"].get("content") or ""))


def parse_sse_line(line: str) -> str | None:
    """The text piece of one server-sent-event line; "" for lines without text; None at `[DONE]`."""
    if not line.startswith("data:"):
        return ""
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return None
    data = json.loads(payload)
    if "error" in data or data.get("object") == "error":
        raise error_from_body(None, payload)
    choices = data.get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


def base_card(cards: Sequence[ModelCard]) -> ModelCard:
    for card in cards:
        if not card.is_adapter:
            return card
    raise ServerUnavailable("vLLM lists no base model")


def served_from(cards: Sequence[ModelCard], name: str) -> str | None:
    """The path adapter `name` is served from, or None when it is not loaded."""
    return next((card.root for card in cards if card.id == name and card.is_adapter), None)


@contextlib.contextmanager
def naming_adapter(name: str, path: str) -> Iterator[None]:
    """Prefix a rejected load with the adapter's name and path (vLLM hides the path in its message)."""
    try:
        yield
    except RequestRejected as exc:
        raise type(exc)(f"adapter {name!r} at {path}: {exc}", status=exc.status, kind=exc.kind) from exc


def retryable(exc: httpx.TransportError) -> bool:
    # A read timeout means the server is alive but slow: repeating the request only adds load.
    return not isinstance(exc, httpx.ReadTimeout)
