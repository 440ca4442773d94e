"""What every chat backend offers: complete or stream a reply of one adapter to one conversation.

Two implementations: `doppel.serve.vllm.VllmBackend` (a vLLM server over HTTP) and
`doppel.serve.local.LocalBackend` (transformers + peft in this process, for the embedded mode). Callers build
`messages` with `doppel.slack.conversation.build_conversation` in both cases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# The name that selects the base model with no adapter, in both backends (PEFT's own convention).
BASE_ADAPTER = "__base__"

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; the defaults are the original DoppelBot's."""

    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    max_tokens: int = 1024
    seed: int | None = None

    def override(self, **changes: Any) -> GenerationParams:
        """A copy with `changes` applied; `None` values keep the current setting."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


DEFAULT_PARAMS = GenerationParams()


class ChatBackend(Protocol):
    def complete(self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS) -> str:
        """The whole reply of `adapter` (or `BASE_ADAPTER`) to `messages`."""
        ...

    def stream(
        self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        """The reply as text pieces, in order, as they are generated."""
        ...
