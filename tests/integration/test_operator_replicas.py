"""Two operator replicas (`operator.replicas: 2`): kopf peering lets exactly one act, and the other takes
over when it dies.

Two real operators under kopf against kmock, each in its own thread and event loop with its own peer id,
sharing the KopfPeering object the chart installs. One DoppelUser: exactly one scrape Job and one train
Job, each phase change written (and told in an Event) once; the active replica is killed while the train
Job runs, and the standby carries the object through the end of training.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from tests.integration.test_operator_conditions import doppeluser
from tests.support.kube_fixtures import NAMESPACE, Kube, OperatorProcess, config_with
from tests.support.slack_fixtures import ACME_TOKEN

from doppel.operator import jobs

PEERING = "doppel"


def phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


async def peers(kube: Kube) -> dict[str, dict[str, Any]]:
    """The live records of the peering object: peer id -> {priority, lastseen, lifetime}."""
    obj = await kube.kubectl.get("KopfPeering", PEERING)
    return {peer: info for peer, info in ((obj or {}).get("status") or {}).items() if info}


async def test_two_replicas_act_once_and_the_standby_takes_over(
    kube, operator_config, slack_emulator, tiny_model
):
    await kube.kubectl.create(
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": PEERING, "namespace": NAMESPACE},
        }
    )
    await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
    base = config_with(
        operator_config,
        namespaces=(NAMESPACE,),
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "1000"),
        peering=PEERING,
        # Long enough that a replica slowed by a loaded machine is not taken for dead (two actives).
        peering_lifetime_s=10,
    )
    replicas = {name: OperatorProcess(config_with(base, peer_id=name)) for name in ("replica-a", "replica-b")}
    kube.jobs.hold("train")
    try:
        for replica in replicas.values():
            await replica.start()
        for _ in range(300):
            if len(await peers(kube)) == 2:
                break
            await asyncio.sleep(0.1)
        seen = await peers(kube)
        assert set(seen) == set(replicas), seen
        active = max(seen, key=lambda peer: seen[peer]["priority"])
        await asyncio.sleep(3.0)  # the lower priority has seen the higher one and paused

        manifest = doppeluser("alice", baseModel={"servedName": "doppel-tiny", "path": str(tiny_model)})
        manifest["spec"]["training"] = {
            "rank": 8,
            "alpha": 16,
            "maxSteps": 2,
            "minSamples": 3,
            "batchSize": 2,
        }
        await kube.kubectl.create(manifest)
        await kube.wait_for("alice", lambda o: phase(o) == "Training", 120, "Training")
        await asyncio.sleep(1.0)  # time for a second replica's duplicate work, if there were one

        # Mid-training, the active replica dies; the train Job goes on without it.
        await replicas[active].kill()
        kube.jobs.release("train")
        obj = await kube.wait_for("alice", lambda o: phase(o) == "Registering", 300, "trained by the standby")
        assert obj["status"]["pendingAdapter"]["version"] == 1
    finally:
        kube.jobs.release("train")
        for replica in replicas.values():
            await replica.stop()

    steps = Counter(job["metadata"]["labels"][jobs.L_STEP] for job in kube.cluster.jobs())
    assert steps["scrape"] == 1 and steps["train"] == 1, steps

    # Every phase change was made (and told) once: no replica repeated another's transition.
    changes = [
        e["message"].split(":")[0] for e in await kube.kubectl.events() if e["message"].startswith("phase ")
    ]
    assert "phase Scraping -> Training" in changes and "phase Training -> Registering" in changes, changes
    # (A change of reason within one phase, such as Registering while vLLM is missing, may recur.)
    moves = [change for change in changes if len(set(change.removeprefix("phase ").split(" -> "))) == 2]
    duplicates = [change for change, count in Counter(moves).items() if count > 1]
    assert duplicates == [], changes
