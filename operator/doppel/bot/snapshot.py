"""A workspace's doppels as the mention path reads them: re-read at most every `ttl_s`, one read at a time.

Every mention needs the namespace's DoppelUsers and its active doppel. Read per mention, a burst of
mentions becomes a burst of API-server calls; cached, a change (a doppel turning Ready, `/doppel switch`)
is seen within `ttl_s`, and at once on this replica, since the commands invalidate the entry.
"""

from __future__ import annotations

import asyncio
import time

from doppel.bot.directory import Directory
from doppel.bot.logic import Snapshot


class Snapshots:
    """Used from one event loop (the answer worker's); `invalidate` may be called from any thread."""

    def __init__(self, directory: Directory, ttl_s: float = 2.0) -> None:
        self.directory, self.ttl_s = directory, ttl_s
        # Keyed by (namespace, team): workspaces sharing a namespace each see only their own doppels.
        self._entries: dict[tuple[str, str], tuple[float, Snapshot]] = {}
        self._reading: dict[tuple[str, str], asyncio.Task[Snapshot]] = {}

    async def get(self, namespace: str, team_id: str) -> Snapshot:
        key = (namespace, team_id)
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() - entry[0] < self.ttl_s:
            return entry[1]
        task = self._reading.get(key)
        if task is None:
            task = asyncio.create_task(self._read(key))
            self._reading[key] = task
            task.add_done_callback(lambda _: self._reading.pop(key, None))
        return await asyncio.shield(task)

    async def _read(self, key: tuple[str, str]) -> Snapshot:
        started = time.monotonic()
        doppels, state = await asyncio.gather(
            self.directory.list_doppels(*key), self.directory.get_state(*key)
        )
        snapshot = Snapshot(doppels, state.get("active") or None)
        self._entries[key] = (started, snapshot)
        return snapshot

    def invalidate(self, namespace: str, team_id: str) -> None:
        self._entries.pop((namespace, team_id), None)
