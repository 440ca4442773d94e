"""Where the bot finds a doppel's memory and feedback on the shared volume.

- The memory index is beside the adapter (`status.adapter.path` + `/memory`), which the bot reads at the
  path the vLLM pods do (the chart mounts the volume at the same place). Loaded once per adapter version
  (they never change once written) and only for the doppel's own person and workspace.
- Feedback lives in the doppel's data directory, `DOPPEL_DATA_ROOT/NAMESPACE/NAME/feedback` (the directory
  `forget` removes); with no data root configured there are no feedback buttons. `doppel local` passes
  its own `feedback_dir`.
A doppel with neither simply answers as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doppel.errors import BadInput
from doppel.memory import meaning
from doppel.memory.feedback import FeedbackStore
from doppel.memory.index import MEMORY_DIR, MemoryIndex
from doppel.memory.support import warm

LOG = logging.getLogger(__name__)
CACHED_INDEXES = 32

FeedbackDir = Callable[[str, dict[str, Any]], Path | None]


def data_root_feedback(data_root: str | None) -> FeedbackDir:
    """The doppel's data directory under `data_root`, as the operator lays it out."""

    def where(namespace: str, doppel: dict[str, Any]) -> Path | None:
        return Path(data_root) / namespace / doppel["metadata"]["name"] if data_root else None

    return where


class Memories:
    """Memory indexes (cached by adapter path) and feedback stores of the doppels."""

    def __init__(self, feedback_dir: FeedbackDir) -> None:
        self.feedback_dir = feedback_dir
        self._indexes: OrderedDict[str, MemoryIndex | None] = OrderedDict()

    async def index_for(self, doppel: dict[str, Any], team_id: str) -> MemoryIndex | None:
        adapter = ((doppel.get("status") or {}).get("adapter") or {}).get("path")
        person = ((doppel.get("spec") or {}).get("target") or {}).get("userId")
        if not adapter:
            return None
        key = f"{team_id}:{person}:{adapter}"
        if key not in self._indexes:
            self._indexes[key] = await asyncio.to_thread(_load, Path(adapter) / MEMORY_DIR, team_id, person)
            while len(self._indexes) > CACHED_INDEXES:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(key)
        return self._indexes[key]

    def store(self, namespace: str, doppel: dict[str, Any]) -> FeedbackStore | None:
        where = self.feedback_dir(namespace, doppel)
        return FeedbackStore(where) if where is not None else None


def _load(where: Path, team_id: str, person: str | None) -> MemoryIndex | None:
    if not where.is_dir():
        return None  # an adapter trained before memory existed, or a bot without the volume
    try:
        index = MemoryIndex.load(where, team=team_id, person_id=person)
        warm()  # the support's word list (about a second), here in a thread, not on the event loop
        meaning.model()  # and the embedding model (under a second)
        return index
    except (BadInput, OSError, ValueError) as exc:
        LOG.warning("memory at %s not used: %s", where, exc)
        return None
