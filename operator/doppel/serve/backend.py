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


# A doppel's replies open at this temperature (`GenerationParams.opening_temperature`). At a low temperature
# every reply opens the same way: the most likely first token wins even where it is one opening of many. The
# adapters of hyperledger's five most active people, greedy, opened 57 of 91 held-out replies with an
# @mention, against 13 of the people's own replies to the same messages; with the first token sampled at 1.0
# and the rest greedy, 17.
OPENING_TEMPERATURE = 1.0


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; the defaults are the original DoppelBot's, with the opening sampled."""

    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    max_tokens: int = 1024
    seed: int | None = None
    # The reply's first token is sampled at this temperature, the rest at `temperature`: the person's own mix
    # of openings, and a reply as focused as before after it. None (or not above `temperature`): one
    # temperature throughout.
    opening_temperature: float | None = None

    @property
    def samples_opening(self) -> bool:
        return self.opening_temperature is not None and self.opening_temperature > self.temperature

    def override(self, **changes: Any) -> GenerationParams:
        """A copy with `changes` applied; `None` values keep the current setting."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


DEFAULT_PARAMS = GenerationParams(opening_temperature=OPENING_TEMPERATURE)


class ChatBackend(Protocol):
    def complete(self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS) -> str:
        """The whole reply of `adapter` (or `BASE_ADAPTER`) to `messages`."""
        ...

    def stream(
        self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        """The reply as text pieces, in order, as they are generated."""
        ...
