"""Which Slack events were already handled: Slack retries unacknowledged or slow events, and several bot
replicas may receive them, so each event is answered once. The record must be shared and outlive a
restart: Kubernetes objects (the default) or the SQL database when one is configured.

Claims expire; `sweep` deletes the expired ones. It runs in the background (`doppel.bot.background`), never on
the way of a mention."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from doppel.bot.kube import LABEL_EVENT, Kube
from doppel.bot.logic import event_key


class EventLedger(Protocol):
    async def claim(self, team_id: str, event_id: str) -> bool:
        """True the first time `event_id` of `team_id` is claimed, by anyone; False afterwards."""
        ...

    async def release(self, team_id: str, event_id: str) -> None:
        """Give a claim back (what it stood for did not happen): the next claim of it wins."""
        ...

    async def sweep(self) -> int:
        """Forget the claims past their expiry; returns how many went."""
        ...


LEDGER_CONFIGMAP = "doppel-events"
SHARDS = 16
ATTEMPTS = 10


def ledger_configmap(key: str) -> str:
    """The ConfigMap holding the claim of event `key` (a hex digest): one of `SHARDS`, always the same."""
    return f"{LEDGER_CONFIGMAP}-{int(key[:4], 16) % SHARDS:02d}"


def _expiry(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


class KubeEventLedger:
    """A fixed set of ConfigMaps in the bot's namespace (`doppel-events-00` to `-15`, an event's by its key),
    each mapping the keys of recent events to when their claim expires: the object count never grows with
    the events, so a namespace's object-count quota is met by 16 ConfigMaps. A ConfigMap takes 1 MiB, about
    17,000 claims: 270,000 events within one TTL (an hour by default).

    A claim reads its ConfigMap and writes its key on the resourceVersion it read: when another replica wrote
    meanwhile the API server refuses (409) and the claim reads again, so of several replicas exactly one
    wins an event. Within a process the claims of one ConfigMap go one write at a time, together (a burst of
    mentions costs a read and a write per ConfigMap, not per event, and loses no race to itself). Each write
    drops the expired keys; `sweep` drops those of ConfigMaps no claim wrote to lately."""

    def __init__(self, kube: Kube, namespace: str, ttl_s: int) -> None:
        self.kube, self.namespace, self.ttl_s = kube, namespace, ttl_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending: dict[str, list[tuple[str, asyncio.Future[bool]]]] = {}

    async def claim(self, team_id: str, event_id: str) -> bool:
        key = event_key(team_id, event_id)
        name = ledger_configmap(key)
        decided: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(name, []).append((key, decided))
        async with self._locks.setdefault(name, asyncio.Lock()):
            if not decided.done():  # not decided by the write before: this one takes every claim waiting
                batch, self._pending[name] = self._pending[name], []
                try:
                    won = await self._write(name, [key for key, _ in batch])
                except asyncio.CancelledError:
                    # This claim's caller went away: the others go back for the next of them to write.
                    self._pending[name][:0] = [item for item in batch if item[1] is not decided]
                    raise
                except Exception as exc:
                    for _, waiting in batch:
                        waiting.set_exception(exc)
                else:
                    for (_, waiting), result in zip(batch, won, strict=True):
                        waiting.set_result(result)
        return await decided

    async def release(self, team_id: str, event_id: str) -> None:
        key = event_key(team_id, event_id)
        name = ledger_configmap(key)
        async with self._locks.setdefault(name, asyncio.Lock()):
            for _ in range(ATTEMPTS):
                found = await self.kube.read_configmap(self.namespace, name)
                if found is None or key not in found[0]:
                    return
                if await self.kube.change_configmap(self.namespace, name, {key: None}, found[1]):
                    return
                await asyncio.sleep(random.uniform(0.0, 0.05))  # another replica wrote first: read it again
        raise RuntimeError(f"event ledger {name}: {ATTEMPTS} writes in a row lost to other replicas")

    async def _write(self, name: str, keys: list[str]) -> list[bool]:
        """Claim `keys` in ConfigMap `name`: for each, whether this call claimed it."""
        for _ in range(ATTEMPTS):
            now = time.time()
            expires = str(int(now + self.ttl_s))
            found = await self.kube.read_configmap(self.namespace, name)
            data, version = found if found is not None else ({}, None)
            changes: dict[str, str | None] = {k: None for k, v in data.items() if _expiry(v) < now}
            won = []
            for key in keys:
                won.append(_expiry(data.get(key)) < now and changes.get(key) is None)
                if won[-1]:
                    changes[key] = expires
            if not any(won):
                return won
            if version is None:
                created = {k: v for k, v in changes.items() if v is not None}
                if await self.kube.create_configmap(self.namespace, name, {LABEL_EVENT: "ledger"}, created):
                    return won
            elif await self.kube.change_configmap(self.namespace, name, changes, version):
                return won
            await asyncio.sleep(random.uniform(0.0, 0.05))  # another replica wrote first: read it again
        raise RuntimeError(f"event ledger {name}: {ATTEMPTS} writes in a row lost to other replicas")

    async def sweep(self) -> int:
        now, gone = time.time(), 0
        ledgers = await self.kube.configmaps_with_versions(self.namespace, f"{LABEL_EVENT}=ledger")
        for name, (data, version) in ledgers.items():
            expired: dict[str, str | None] = {k: None for k, v in data.items() if _expiry(v) < now}
            if expired and await self.kube.change_configmap(self.namespace, name, expired, version):
                gone += len(expired)
        # The one-ConfigMap-per-event claims of earlier versions, until they have all expired.
        return gone + await self.kube.expire_claims(self.namespace, now)


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

    async def release(self, team_id: str, event_id: str) -> None:
        await asyncio.to_thread(self._release, event_key(team_id, event_id))

    async def sweep(self) -> int:
        return await asyncio.to_thread(self._sweep)

    def _release(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(self.table).where(self.table.c.key == key))

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

    async def release(self, team_id: str, event_id: str) -> None:
        self._seen.pop(event_key(team_id, event_id), None)

    async def sweep(self) -> int:
        now = time.time()
        gone = [key for key, expires in self._seen.items() if expires < now]
        for key in gone:
            del self._seen[key]
        return len(gone)
