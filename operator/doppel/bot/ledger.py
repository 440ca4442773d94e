"""Which Slack events were already handled: Slack retries unacknowledged or slow events, and several bot
replicas may receive them, so each event is answered once. The record must be shared and outlive a
restart: Kubernetes objects (the default) or the SQL database when one is configured.

Claims expire; `sweep` deletes the expired ones. It runs in the background (`doppel.bot.background`), never on
the way of a mention."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from doppel.bot.kube import Kube
from doppel.bot.logic import event_key


class EventLedger(Protocol):
    async def claim(self, team_id: str, event_id: str) -> bool:
        """True the first time `event_id` of `team_id` is claimed, by anyone; False afterwards."""
        ...

    async def sweep(self) -> int:
        """Forget the claims past their expiry; returns how many went."""
        ...


class KubeEventLedger:
    """One ConfigMap per event in the bot's namespace, named after the event; 409 means seen."""

    def __init__(self, kube: Kube, namespace: str, ttl_s: int) -> None:
        self.kube, self.namespace, self.ttl_s = kube, namespace, ttl_s

    async def claim(self, team_id: str, event_id: str) -> bool:
        return await self.kube.claim(self.namespace, event_key(team_id, event_id), self.ttl_s)

    async def sweep(self) -> int:
        return await self.kube.expire_claims(self.namespace, time.time())


class SqlEventLedger:
    """A table with the event key as primary key: the database refuses the second insert."""

    def __init__(self, url: str, ttl_s: int) -> None:
        self.engine = sa.create_engine(url)
        self.ttl_s = ttl_s
        self.table = sa.Table(
            "doppel_seen_events",
            sa.MetaData(),
            sa.Column("key", sa.String(40), primary_key=True),
            sa.Column("expires_at", sa.Float, nullable=False, index=True),
        )
        self.table.create(self.engine, checkfirst=True)

    async def claim(self, team_id: str, event_id: str) -> bool:
        return await asyncio.to_thread(self._claim, event_key(team_id, event_id))

    async def sweep(self) -> int:
        return await asyncio.to_thread(self._sweep)

    def _sweep(self) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.delete(self.table).where(self.table.c.expires_at < time.time())).rowcount

    def _claim(self, key: str) -> bool:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(self.table).values(key=key, expires_at=now + self.ttl_s))
        except IntegrityError:
            # Seen; unless that claim has expired and is not swept yet: then it is this one's (atomic).
            stale = self.table.c.key == key, self.table.c.expires_at < now
            with self.engine.begin() as conn:
                taken = conn.execute(sa.update(self.table).where(*stale).values(expires_at=now + self.ttl_s))
                return taken.rowcount == 1
        return True


class MemoryEventLedger:
    """For one process with no cluster (`doppel local`): nothing to share with, nothing survives anyway."""

    def __init__(self, ttl_s: float = 3600.0) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, float] = {}  # key -> expiry

    async def claim(self, team_id: str, event_id: str) -> bool:
        key = event_key(team_id, event_id)
        if self._seen.get(key, 0.0) >= time.time():
            return False
        self._seen[key] = time.time() + self.ttl_s
        return True

    async def sweep(self) -> int:
        now = time.time()
        gone = [key for key, expires in self._seen.items() if expires < now]
        for key in gone:
            del self._seen[key]
        return len(gone)
