"""Errors of the serving backends, each with a one-line message.

Errors the caller must fix (a bad adapter, an unknown name) are also `BadInput`, so the CLI exits 2 and the
operator does not retry them; `ServerUnavailable` is transient and worth retrying later.
"""

from __future__ import annotations

from doppel.errors import BadInput


class ServeError(Exception):
    """Any failure of a serving backend. `status` and `kind` are vLLM's HTTP status and error type."""

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None) -> None:
        # One line, bounded: vLLM sometimes returns whole tracebacks as the message.
        line = " ".join(message.split())
        super().__init__(line[:500])
        self.status = status
        self.kind = kind


class ServerUnavailable(ServeError):
    """The server could not be reached, dropped the connection, or kept failing with 5xx."""


class RequestRejected(ServeError, BadInput):
    """The server refused the request as invalid (4xx, or an adapter it cannot load)."""


class UnknownModel(RequestRejected):
    """No base model or adapter of that name is being served."""


class AdapterAlreadyLoaded(RequestRejected):
    """vLLM already serves an adapter of that name (the client resolves this itself)."""


class AdapterNotFound(RequestRejected):
    """No adapter at the given path (as seen by the server)."""


class AdapterRankTooLarge(RequestRejected):
    """The adapter's LoRA rank exceeds the server's --max-lora-rank."""


class BaseModelMismatch(RequestRejected):
    """The adapter was trained for another base model (its modules or shapes do not fit)."""


class InvalidAdapter(RequestRejected):
    """The adapter directory is malformed or uses a feature the server does not support."""
