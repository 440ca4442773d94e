"""Mentions held while the model pool is cold (no vLLM pod ready): a durable record of each, shared by the
bot's replicas and outliving a restart, so a held mention is answered (or apologised for) exactly once.

`hold` is atomic (a second hold of the same mention is refused: one "waking up" note per mention); `take`
is atomic too (of several replicas, or a replica and its restarted self, exactly one gets the record and
answers). Kubernetes ConfigMaps in the bot's namespace (the default), a table of the SQL database when one
is configured, or memory for one process with no cluster (`doppel local`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from doppel.bot.kube import Kube
from doppel.bot.logic import Tenant, event_key, mention_key

LABEL_HELD = "doppel.dev/held-mention"


@dataclass(frozen=True)
class HeldMention:
    """What answering a held mention later needs: whose workspace, the bot's user, the mention itself."""

    tenant: Tenant
    bot: tuple[str | None, str | None]  # this app's bot user ID and bot ID
    event: dict[str, Any]  # the app_mention event: channel, ts, thread_ts, user, text
    doppel: str  # the handle of the doppel it was for (for the apology)
    held_at: float  # time.time() when held
    deadline: float  # time.time() after which it is apologised for instead
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", event_key(self.tenant.team_id, mention_key(self.event)))

    def to_json(self) -> str:
        body = asdict(self)
        body.pop("key")
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> HeldMention:
        body = json.loads(text)
        return cls(**{**body, "tenant": Tenant(**body["tenant"]), "bot": tuple(body["bot"])})


def held_mention(
    tenant: Tenant,
    bot: tuple[str | None, str | None],
    event: dict[str, Any],
    doppel: str,
    deadline_s: float,
) -> HeldMention:
    """A mention held now, due `deadline_s` after it was written (its Slack timestamp)."""
    now = time.time()
    event = {k: event[k] for k in ("channel", "ts", "thread_ts", "user", "text") if k in event}
    return HeldMention(tenant, bot, event, doppel, now, float(event["ts"]) + deadline_s)


class HeldStore(Protocol):
    async def hold(self, mention: HeldMention) -> bool:
        """Record `mention`; False when it was held already (by anyone)."""
        ...

    async def list(self) -> list[HeldMention]:
        """Every mention held now, oldest first."""
        ...

    async def take(self, key: str) -> bool:
        """Remove the record `key`: True for exactly one caller, who then answers it."""
        ...


class KubeHeldStore:
    """One labelled ConfigMap per held mention in the bot's namespace; create and delete are atomic."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace

    @staticmethod
    def _name(key: str) -> str:
        return f"doppel-held-{key}"

    async def hold(self, mention: HeldMention) -> bool:
        data = {"mention": mention.to_json()}
        return await self.kube.create_configmap(
            self.namespace, self._name(mention.key), {LABEL_HELD: "true"}, data
        )

    async def list(self) -> list[HeldMention]:
        found = await self.kube.list_configmaps(self.namespace, f"{LABEL_HELD}=true")
        held = [HeldMention.from_json(data["mention"]) for data in found if "mention" in data]
        return sorted(held, key=lambda m: m.held_at)

    async def take(self, key: str) -> bool:
        return await self.kube.delete_configmap(self.namespace, self._name(key))


class SqlHeldStore:
    """A table keyed by the mention: the database refuses the second insert, and one delete wins."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        self.table = sa.Table(
            "doppel_held_mentions",
            sa.MetaData(),
            sa.Column("key", sa.String(40), primary_key=True),
            sa.Column("held_at", sa.Float, nullable=False),
            sa.Column("body", sa.Text, nullable=False),
        )
        self.table.create(self.engine, checkfirst=True)

    async def hold(self, mention: HeldMention) -> bool:
        return await asyncio.to_thread(self._hold, mention)

    def _hold(self, mention: HeldMention) -> bool:
        try:
            with self.engine.begin() as conn:
                row = {"key": mention.key, "held_at": mention.held_at, "body": mention.to_json()}
                conn.execute(sa.insert(self.table).values(**row))
        except IntegrityError:
            return False
        return True

    async def list(self) -> list[HeldMention]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> list[HeldMention]:
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(self.table.c.body).order_by(self.table.c.held_at))
            return [HeldMention.from_json(body) for (body,) in rows]

    async def take(self, key: str) -> bool:
        return await asyncio.to_thread(self._take, key)

    def _take(self, key: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(sa.delete(self.table).where(self.table.c.key == key)).rowcount == 1


class MemoryHeldStore:
    """For one process with no cluster: nothing to share with, nothing survives anyway."""

    def __init__(self) -> None:
        self._held: dict[str, HeldMention] = {}

    async def hold(self, mention: HeldMention) -> bool:
        if mention.key in self._held:
            return False
        self._held[mention.key] = mention
        return True

    async def list(self) -> list[HeldMention]:
        return sorted(self._held.values(), key=lambda m: m.held_at)

    async def take(self, key: str) -> bool:
        return self._held.pop(key, None) is not None
