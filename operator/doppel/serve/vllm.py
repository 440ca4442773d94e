"""Client of vLLM's OpenAI-compatible server: models, runtime LoRA adapters, chat completions.

A sync client (CLI, `doppel chat`) and an async one (operator, bot) share the pure request building and
response parsing of vllm_protocol.py; each adds only its own I/O loop.

Adapter loading is idempotent. vLLM answers 400 "already been loaded" for a known name; the client then looks
the name up in /v1/models: the same path is success, another path is reloaded with `load_inplace`. vLLM 0.32
loads and validates the new weights first and swaps them under the same adapter id, so the name never
serves nothing, and its prefix cache is keyed by (name, path), so no block computed with the old weights is
reused for a new path. New weights at an old path would go unnoticed: adapters are written once, to
versioned paths, and never changed in place (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx

from doppel.serve.addressing import Addressing
from doppel.serve.backend import BASE_ADAPTER, DEFAULT_PARAMS, GenerationParams, Messages
from doppel.serve.errors import AdapterAlreadyLoaded, ServeError, ServerUnavailable, UnknownModel
from doppel.serve.vllm_protocol import (
    CHAT_PATH,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    DETOKENIZE_PATH,
    LOAD_PATH,
    MODELS_PATH,
    TOKENIZE_PATH,
    UNLOAD_PATH,
    LoadOutcome,
    ModelCard,
    RetryPolicy,
    base_card,
    chat_body,
    error_from_body,
    load_body,
    naming_adapter,
    opening_body,
    parse_chat,
    parse_models,
    parse_opening,
    parse_sse_line,
    retryable,
    served_from,
)

# --- sync client -----------------------------------------------------------------------------------------


def server_root(url: str) -> str:
    """The server's own address from what a person may give: OpenAI clients are configured with the API's
    base, `http://host:8000/v1`, which would make every path here `/v1/v1/...`."""
    root = url.strip().rstrip("/")
    return root.removesuffix("/v1").rstrip("/")


class VllmClient:
    """Blocking client of one vLLM server."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.base_url = server_root(base_url)
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
                if not retryable(exc):
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
        opening = self._opening(model, messages, params)
        body = self._chat_body(model, messages, params, stream=False, opening=opening)
        return parse_chat(self._send("POST", CHAT_PATH, body).json(), messages, opening)

    def stream_chat(
        self, model: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        opening = self._opening(model, messages, params)
        body = self._chat_body(model, messages, params, stream=True, opening=opening)
        response = self._send("POST", CHAT_PATH, body, stream=True)
        try:
            if opening:
                yield opening
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
        self, model: str, messages: Messages, params: GenerationParams, *, stream: bool, opening: str = ""
    ) -> dict[str, Any]:
        context = self.base_model().max_model_len
        return chat_body(model, messages, params, stream=stream, context=context, opening=opening)

    def _opening(self, model: str, messages: Messages, params: GenerationParams) -> str:
        """The reply's sampled first token ("" when it is not sampled apart: `opening_body`)."""
        body = opening_body(model, messages, params, context=self.base_model().max_model_len)
        return parse_opening(self._send("POST", CHAT_PATH, body).json()) if body else ""

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
        retry: RetryPolicy = DEFAULT_RETRY,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """`http`: a pooled client shared with other servers' clients (the operator talks to every pod
        through one: connections are kept, not set up again per call); it stays open on `aclose`."""
        self.base_url = server_root(base_url)
        self.retry = retry
        self._owned = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)
        self._base: ModelCard | None = None

    async def aclose(self) -> None:
        if self._owned:
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
                request = self._http.build_request(method, self.base_url + path, json=body)
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = ServerUnavailable(f"vLLM at {self.base_url} unreachable: {type(exc).__name__} {exc}")
                if not retryable(exc):
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
            return (await self._http.get(f"{self.base_url}/health", timeout=5.0)).status_code == 200
        except httpx.TransportError:
            return False

    async def list_models(self) -> list[ModelCard]:
        return parse_models((await self._send("GET", MODELS_PATH)).json())

    async def base_model(self) -> ModelCard:
        if self._base is None:
            self._base = base_card(await self.list_models())
        return self._base

    async def _chat_body(
        self, model: str, messages: Messages, params: GenerationParams, *, stream: bool, opening: str = ""
    ) -> dict[str, Any]:
        context = (await self.base_model()).max_model_len
        return chat_body(model, messages, params, stream=stream, context=context, opening=opening)

    async def _opening(self, model: str, messages: Messages, params: GenerationParams) -> str:
        """See `VllmClient._opening`."""
        body = opening_body(model, messages, params, context=(await self.base_model()).max_model_len)
        return parse_opening((await self._send("POST", CHAT_PATH, body)).json()) if body else ""

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
        opening = await self._opening(model, messages, params)
        body = await self._chat_body(model, messages, params, stream=False, opening=opening)
        response = await self._send("POST", CHAT_PATH, body)
        return parse_chat(response.json(), messages, opening)

    async def stream_chat(
        self, model: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> AsyncIterator[str]:
        opening = await self._opening(model, messages, params)
        body = await self._chat_body(model, messages, params, stream=True, opening=opening)
        response = await self._send("POST", CHAT_PATH, body, stream=True)
        try:
            if opening:
                yield opening
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
        pieces = self.client.stream_chat(self.model_name(adapter), messages, params)
        return Addressing.of(messages).repair_stream(pieces)
