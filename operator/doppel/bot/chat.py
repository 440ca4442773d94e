"""The one thing the bot needs from a model server, `Chat`: the reply of adapter `model` to `messages`.

`vllm_chat` makes it from the vLLM client (production); `backend_chat` from any sync `ChatBackend`
(`doppel local`'s in-process one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from doppel.serve.backend import DEFAULT_PARAMS, ChatBackend, GenerationParams, Messages
from doppel.serve.vllm import AsyncVllmClient

Chat = Callable[[str, Messages], Awaitable[str]]


def vllm_chat(client: AsyncVllmClient, params: GenerationParams = DEFAULT_PARAMS) -> Chat:
    async def chat(model: str, messages: Messages) -> str:
        return await client.chat(model, messages, params)

    return chat


def backend_chat(backend: ChatBackend, params: GenerationParams = DEFAULT_PARAMS) -> Chat:
    """A sync `ChatBackend` (e.g. `doppel local`'s in-process one) as the bot's `Chat`, off the event loop."""

    async def chat(model: str, messages: Messages) -> str:
        return await asyncio.to_thread(backend.complete, model, messages, params)

    return chat
