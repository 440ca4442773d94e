"""Client of vLLM's OpenAI-compatible server: models, runtime LoRA adapters, chat completions.

A sync client (CLI, `doppel chat`) and an async one (operator, bot) share the pure request-building and
response-parsing functions below; each adds only its own I/O loop.

Adapter loading is idempotent. vLLM answers 400 "already been loaded" for a known name; the client then looks
the name up in /v1/models: the same path is success, another path is reloaded with `load_inplace`. vLLM 0.32
loads and validates the new weights first and swaps them under the same adapter id, so the name never
serves nothing, and its prefix cache is keyed by (name, path), so no block computed with the old weights is
reused for a new path. New weights at an old path would go unnoticed: adapters are written once, to
versioned paths, and never changed in place (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from doppel.serve.backend import BASE_ADAPTER, DEFAULT_PARAMS, GenerationParams, Messages
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


# --- pure request building and response parsing ----------------------------------------------------------


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
    model: str, messages: Messages, params: GenerationParams, *, stream: bool, context: int | None = None
) -> dict[str, Any]:
    """The chat completion request; `max_tokens` is capped at the server's context length `context`,
    which vLLM otherwise rejects (it stops by itself where prompt + reply fill the context)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "temperature": params.temperature,
        "top_p": params.top_p,
        # top_k and repetition_penalty are vLLM's extensions of the OpenAI request.
        "top_k": params.top_k,
        "repetition_penalty": params.repetition_penalty,
        "max_tokens": min(params.max_tokens, context) if context else params.max_tokens,
        "stream": stream,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def parse_models(data: dict[str, Any]) -> list[ModelCard]:
    return [
        ModelCard(
            id=m["id"], root=m.get("root"), parent=m.get("parent"), max_model_len=m.get("max_model_len")
        )
        for m in data.get("data", [])
    ]


def parse_chat(data: dict[str, Any]) -> str:
    return str(data["choices"][0]["message"].get("content") or "")


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


def _retryable(exc: httpx.TransportError) -> bool:
    # A read timeout means the server is alive but slow: repeating the request only adds load.
    return not isinstance(exc, httpx.ReadTimeout)


# --- sync client -----------------------------------------------------------------------------------------


class VllmClient:
    """Blocking client of one vLLM server."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._base: ModelCard | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, stream: bool = False
    ) -> httpx.Response:
        error: ServeError | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                time.sleep(self.retry.delay(attempt - 1))
            try:
                request = self._http.build_request(method, path, json=body)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = ServerUnavailable(f"vLLM at {self.base_url} unreachable: {type(exc).__name__} {exc}")
                if not _retryable(exc):
                    raise error from exc
                continue
            if response.is_success:
                return response
            response.read()
            response.close()
            error = error_from_body(response.status_code, response.text)
            if not isinstance(error, ServerUnavailable):
                raise error
        assert error is not None
        raise error

    def health(self) -> bool:
        try:
            return self._http.get("/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def list_models(self) -> list[ModelCard]:
        return parse_models(self._send("GET", MODELS_PATH).json())

    def base_model(self) -> ModelCard:
        """The served base model (looked up once: a server serves one base model for its lifetime)."""
        if self._base is None:
            self._base = base_card(self.list_models())
        return self._base

    def load_adapter(self, name: str, path: str) -> LoadOutcome:
        """Serve the adapter at `path` (a path on the server's filesystem) as `name`, idempotently."""
        with naming_adapter(name, path):
            try:
                self._send("POST", LOAD_PATH, load_body(name, path))
                return LoadOutcome.LOADED
            except AdapterAlreadyLoaded:
                current = served_from(self.list_models(), name)
            if current == path:
                return LoadOutcome.UNCHANGED
            self._send("POST", LOAD_PATH, load_body(name, path, inplace=True))
            return LoadOutcome.REPLACED if current is not None else LoadOutcome.LOADED

    def unload_adapter(self, name: str, *, missing_ok: bool = False) -> bool:
        """Stop serving `name`; False when it was not loaded and `missing_ok`."""
        try:
            self._send("POST", UNLOAD_PATH, {"lora_name": name})
        except UnknownModel:
            if missing_ok:
                return False
            raise
        return True

    def chat(self, model: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS) -> str:
        return parse_chat(
            self._send("POST", CHAT_PATH, self._chat_body(model, messages, params, stream=False)).json()
        )

    def stream_chat(
        self, model: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        body = self._chat_body(model, messages, params, stream=True)
        response = self._send("POST", CHAT_PATH, body, stream=True)
        try:
            for line in response.iter_lines():
                piece = parse_sse_line(line)
                if piece is None:
                    return
                if piece:
                    yield piece
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"vLLM at {self.base_url} lost the connection mid-reply") from exc
        finally:
            response.close()
        raise ServerUnavailable(f"vLLM at {self.base_url} ended the reply stream early")

    def _chat_body(
        self, model: str, messages: Messages, params: GenerationParams, *, stream: bool
    ) -> dict[str, Any]:
        context = self.base_model().max_model_len
        return chat_body(model, messages, params, stream=stream, context=context)

    def tokenize_chat(self, model: str, messages: Messages) -> list[int]:
        """The token ids of the prompt vLLM renders for `messages` (chat template + generation prompt)."""
        body = {"model": model, "messages": [dict(m) for m in messages], "add_generation_prompt": True}
        return list(self._send("POST", TOKENIZE_PATH, body).json()["tokens"])

    def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        return str(
            self._send("POST", DETOKENIZE_PATH, {"model": model, "tokens": list(tokens)}).json()["prompt"]
        )


# --- async client ----------------------------------------------------------------------------------------


class AsyncVllmClient:
    """The asyncio twin of `VllmClient`, for the operator and the bot."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._base: ModelCard | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVllmClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, stream: bool = False
    ) -> httpx.Response:
        error: ServeError | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt - 1))
            try:
                request = self._http.build_request(method, path, json=body)
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = ServerUnavailable(f"vLLM at {self.base_url} unreachable: {type(exc).__name__} {exc}")
                if not _retryable(exc):
                    raise error from exc
                continue
            if response.is_success:
                return response
            await response.aread()
            await response.aclose()
            error = error_from_body(response.status_code, response.text)
            if not isinstance(error, ServerUnavailable):
                raise error
        assert error is not None
        raise error

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=5.0)).status_code == 200
        except httpx.TransportError:
            return False

    async def list_models(self) -> list[ModelCard]:
        return parse_models((await self._send("GET", MODELS_PATH)).json())

    async def base_model(self) -> ModelCard:
        if self._base is None:
            self._base = base_card(await self.list_models())
        return self._base

    async def _chat_body(
        self, model: str, messages: Messages, params: GenerationParams, *, stream: bool
    ) -> dict[str, Any]:
        context = (await self.base_model()).max_model_len
        return chat_body(model, messages, params, stream=stream, context=context)

    async def load_adapter(self, name: str, path: str) -> LoadOutcome:
        """See `VllmClient.load_adapter`."""
        with naming_adapter(name, path):
            try:
                await self._send("POST", LOAD_PATH, load_body(name, path))
                return LoadOutcome.LOADED
            except AdapterAlreadyLoaded:
                current = served_from(await self.list_models(), name)
            if current == path:
                return LoadOutcome.UNCHANGED
            await self._send("POST", LOAD_PATH, load_body(name, path, inplace=True))
            return LoadOutcome.REPLACED if current is not None else LoadOutcome.LOADED

    async def unload_adapter(self, name: str, *, missing_ok: bool = False) -> bool:
        try:
            await self._send("POST", UNLOAD_PATH, {"lora_name": name})
        except UnknownModel:
            if missing_ok:
                return False
            raise
        return True

    async def chat(self, model: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS) -> str:
        body = await self._chat_body(model, messages, params, stream=False)
        response = await self._send("POST", CHAT_PATH, body)
        return parse_chat(response.json())

    async def stream_chat(
        self, model: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> AsyncIterator[str]:
        body = await self._chat_body(model, messages, params, stream=True)
        response = await self._send("POST", CHAT_PATH, body, stream=True)
        try:
            async for line in response.aiter_lines():
                piece = parse_sse_line(line)
                if piece is None:
                    return
                if piece:
                    yield piece
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"vLLM at {self.base_url} lost the connection mid-reply") from exc
        finally:
            await response.aclose()
        raise ServerUnavailable(f"vLLM at {self.base_url} ended the reply stream early")


# --- the ChatBackend over vLLM ---------------------------------------------------------------------------


class VllmBackend:
    """`ChatBackend` over a vLLM server; adapters are its served names, `BASE_ADAPTER` the base model."""

    def __init__(self, client: VllmClient) -> None:
        self.client = client

    def model_name(self, adapter: str) -> str:
        return self.client.base_model().id if adapter == BASE_ADAPTER else adapter

    def complete(self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS) -> str:
        return self.client.chat(self.model_name(adapter), messages, params)

    def stream(
        self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        return self.client.stream_chat(self.model_name(adapter), messages, params)
