"""The bot's event ledger in Kubernetes (doppel.bot.ledger.KubeEventLedger): replicas racing on the same
events claim each exactly once, and however many events come, the ledger stays a fixed set of ConfigMaps
(an object-count quota on ConfigMaps is met). Against the emulator, which refuses a write on a stale
resourceVersion with 409 as the API server does."""

from __future__ import annotations

import asyncio
import collections

from tests.support.bot_fixtures import BOT_NAMESPACE, TEAM_ID

from doppel.bot.kube import Kube, api_client
from doppel.bot.ledger import SHARDS, KubeEventLedger


def replica(url: str, ttl_s: int = 3600) -> KubeEventLedger:
    """A bot replica's ledger; 4 threads each (not 16), so that three racing stay well inside the client's
    2.5 s timeout on a loaded 2-core machine."""
    return KubeEventLedger(Kube(api_client(url, connections=4), threads=4), BOT_NAMESPACE, ttl_s)


def configmaps(kmock) -> dict[str, dict[str, str]]:
    return {
        key[2]: dict(kmock.objects[key].get("data") or {})
        for key in list(kmock.objects)
        if key[0].plural == "configmaps" and key[1] == BOT_NAMESPACE and not kmock.objects[key].deleted
    }


async def test_replicas_racing_on_many_events_claim_each_once_in_a_fixed_set_of_configmaps(bot_kube):
    kmock, url = bot_kube
    replicas = [replica(url) for _ in range(3)]
    events = [f"Ev{i:04d}" for i in range(120)]
    claims = [(event, replica) for event in events for replica in replicas]
    results = await asyncio.gather(*(replica.claim(TEAM_ID, event) for event, replica in claims))
    winners = collections.Counter(event for (event, _), won in zip(claims, results, strict=True) if won)
    assert winners == dict.fromkeys(events, 1)  # every event answered, none twice
    held = configmaps(kmock)
    assert 1 < len(held) <= SHARDS and sum(len(data) for data in held.values()) == len(events)
    # Claims of one ConfigMap go together: far fewer writes than claims.
    writes = [r for r in kmock if r.resource is not None and r.resource.plural == "configmaps"]
    assert len([r for r in writes if str(r.method.value).upper() in ("PATCH", "POST")]) < len(claims) / 4

    # Claims past their expiry (written with a TTL already past) are dropped by the next writes: the
    # ledger holds only live claims, in no more objects.
    old = replica(url, ttl_s=-1)
    assert all(await asyncio.gather(*(old.claim(TEAM_ID, f"EvOld{i:04d}") for i in range(120))))
    fresh = [f"EvNext{i:04d}" for i in range(120)]
    assert all(await asyncio.gather(*(replicas[0].claim(TEAM_ID, event) for event in fresh)))
    held = configmaps(kmock)
    assert len(held) <= SHARDS and sum(len(data) for data in held.values()) == len(events) + len(fresh)
    assert not await replicas[1].claim(TEAM_ID, fresh[0]) and not await old.claim(TEAM_ID, events[0])
