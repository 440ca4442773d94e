"""`doppel chat`: a terminal conversation with one adapter, on vLLM or in this process.

The chat is one Slack-like channel: the terminal user's lines and the doppel's replies become
`ThreadMessage`s, and every turn's prompt is the context the samples' rule gives it (`serving_context`: the
channel window, a long pause starts a new conversation) built by `build_conversation`, as the bot builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from doppel.errors import BadInput
from doppel.memory.attribution import drawn_on
from doppel.memory.index import MEMORY_DIR, MemoryIndex, Recall
from doppel.memory.prompt import DEFAULT_SETTINGS, MemorySettings, recall_for
from doppel.memory.voice import abstention
from doppel.serve.backend import DEFAULT_PARAMS, ChatBackend, GenerationParams
from doppel.serve.errors import ServerUnavailable
from doppel.serve.vllm import LoadOutcome, RetryPolicy, VllmBackend, VllmClient
from doppel.slack.conversation import (
    DEFAULT_WINDOW,
    ThreadMessage,
    WindowRule,
    build_conversation,
    serving_context,
)

PERSON_ID = "U0DOPPEL"
USER_ID = "U0CHATTER"
# Fail fast on a dead server: a person is waiting at the terminal.
CHAT_RETRY = RetryPolicy(attempts=2, initial_delay=0.2)


class ChatSession:
    """One thread between the terminal user and the doppel; each reply is streamed and remembered."""

    def __init__(
        self,
        backend: ChatBackend,
        adapter: str,
        person: str,
        *,
        user_name: str = "You",
        channel: str | None = "chat",
        params: GenerationParams = DEFAULT_PARAMS,
        window: WindowRule = DEFAULT_WINDOW,
        clock: Callable[[], float] = time.time,
        memory: MemoryIndex | None = None,
        memory_settings: MemorySettings = DEFAULT_SETTINGS,
    ) -> None:
        self.backend = backend
        self.adapter = adapter
        self.person = person
        self.user_name = user_name
        self.channel = channel
        self.params = params
        self.window = window
        self.clock = clock
        self.thread: list[ThreadMessage] = []
        self.memory, self.memory_settings = memory, memory_settings
        self.recall = Recall()  # what memory gave the last reply
        self.cited = Recall()  # of it, what the reply drew on: its sources

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's `text` to the thread and stream the doppel's answer (added once complete)."""
        self.thread.append(ThreadMessage(USER_ID, self.user_name, text, self.clock()))
        context = serving_context(self.thread, PERSON_ID, in_thread=False, rule=self.window)
        self.recall = self.cited = recall_for(self.memory, context, self.memory_settings)
        messages = build_conversation(
            self.person, PERSON_ID, context, channel=self.channel, memory=self.recall.lines()
        )
        pieces: list[str] = []
        if self.recall.abstain and self.memory is not None:  # nothing of theirs covers it: no guessing
            pieces.append(abstention(self.person, self.memory.meta.get("voice")))
            yield pieces[0]
        else:
            for piece in self.backend.stream(self.adapter, messages, self.params):
                pieces.append(piece)
                yield piece
        if self.memory is not None:
            said = [m.text for m in context]
            self.cited = drawn_on(self.memory, self.recall, "".join(pieces), said)
        self.thread.append(ThreadMessage(PERSON_ID, self.person, "".join(pieces).strip(), self.clock()))


def check_adapter_dir(adapter: Path) -> Path:
    if not adapter.is_dir():
        raise BadInput(f"adapter directory {adapter} does not exist")
    if not (adapter / "adapter_config.json").is_file():
        raise BadInput(f"{adapter} is not a LoRA adapter (no adapter_config.json)")
    return adapter.resolve()


def adapter_memory(adapter: Path) -> MemoryIndex | None:
    """The memory index `doppel train` wrote beside the adapter, if it did."""
    return MemoryIndex.load(adapter / MEMORY_DIR) if (adapter / MEMORY_DIR).is_dir() else None


def adapter_person(adapter: Path) -> str | None:
    """Whose doppel `adapter` is, as `doppel train` recorded it in metrics.json (None if unknown)."""
    try:
        metrics = json.loads((adapter / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    person = metrics.get("person") if isinstance(metrics, dict) else None
    return person if isinstance(person, str) and person else None


def served_name(adapter: Path) -> str:
    """A stable served name for an adapter directory, unique per path."""
    digest = hashlib.sha1(str(adapter).encode()).hexdigest()[:8]
    return f"chat-{adapter.name}-{digest}"


@contextlib.contextmanager
def vllm_chat_backend(url: str, adapter: Path) -> Iterator[tuple[VllmBackend, str]]:
    """Register `adapter` on the vLLM server at `url` for the chat and unregister it afterwards (unless it
    was already being served, in which case someone else owns it). The server must see the same path."""
    client = VllmClient(url, retry=CHAT_RETRY)
    try:
        if not client.health():
            raise BadInput(f"no vLLM server answers at {url}")
        name = served_name(adapter)
        outcome = client.load_adapter(name, str(adapter))
        try:
            yield VllmBackend(client), name
        finally:
            if outcome is not LoadOutcome.UNCHANGED:
                with contextlib.suppress(ServerUnavailable):
                    client.unload_adapter(name, missing_ok=True)
    except ServerUnavailable as exc:
        # For a person at a terminal, a server that is gone is something to fix, not to retry.
        raise BadInput(str(exc)) from exc
    finally:
        client.close()


@contextlib.contextmanager
def local_chat_backend(base_model: Path, adapter: Path) -> Iterator[tuple[ChatBackend, str]]:
    from doppel.serve.local import LocalBackend  # torch: only for the in-process mode

    if not (base_model / "config.json").is_file():
        raise BadInput(f"base model {base_model} not found (no config.json)")
    name = adapter.name or "adapter"
    yield LocalBackend(base_model, {name: adapter}), name
