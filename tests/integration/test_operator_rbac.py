"""RBAC: every API call the operator makes in a real run is allowed by the chart's operator (Cluster)Role,
and the chart allows nothing the code does not use.

The operator runs as the chart runs it (watching its own namespace) through a run that touches every
kind of call: a missing Secret, a scrape, a bad-input failure, a spec change, a train Job whose pod log is
read for progress and which then fails, and a deletion through the finalizer. kmock records each request;
the (apiGroup, resource, verb) triples are checked against the rules `helm template` renders.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.integration.test_operator_conditions import doppeluser
from tests.support.helm import find_manifest, render_chart
from tests.support.kube_fixtures import NAMESPACE, OperatorProcess, config_with
from tests.support.slack_fixtures import ACME_TOKEN

# Rules no single run exercises, and why each is needed.
SITUATIONAL = {
    # Not a call: API servers that enforce blockOwnerDeletion (OpenShift) check it when a Job is created
    # with its DoppelUser as owner.
    ("doppel.dev", "doppelusers/finalizers", "update"): "ownerReferences.blockOwnerDeletion",
    # A superseded Job is deleted. (Patching Jobs, for their TTL once their outcome is recorded, every run
    # does.)
    ("batch", "jobs", "delete"): "a newer generation",
    # Whether its namespace is being deleted (then it releases the finalizers it would otherwise keep).
    ("", "namespaces", "get"): "namespace deletion",
}


def allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.get("apiGroups", [])
        and (resource in rule.get("resources", []) or "*" in rule.get("resources", []))
        and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", []))
        for rule in rules
    )


async def test_operator_uses_only_what_the_chart_grants(kube, operator_config, slack_emulator):
    manifests = render_chart()
    rules = [*find_manifest(manifests, "Role", "operator")["rules"]]
    rules += find_manifest(manifests, "ClusterRole", "operator")["rules"]

    # With the chart's peering object: kopf's peering calls are checked too.
    (peering,) = [m for m in manifests if m["kind"] == "KopfPeering"]
    await kube.kubectl.create(
        {**peering, "metadata": {"name": peering["metadata"]["name"], "namespace": NAMESPACE}}
    )
    config = config_with(
        operator_config,
        namespaces=(NAMESPACE,),
        slack_api_url=slack_emulator.base_url + "/",
        scrape_args=("--rate-scale", "1000"),
        peering=peering["metadata"]["name"],
    )
    operator = OperatorProcess(config)
    await operator.start()
    try:
        await kube.kubectl.create(doppeluser("rbac", user="nobody-here"))
        await kube.wait_for("rbac", lambda o: (o.get("status") or {}).get("reason") == "SecretMissing", 30)
        await kube.kubectl.secret("slack-bot", {"token": ACME_TOKEN})
        await kube.wait_for("rbac", lambda o: (o.get("status") or {}).get("phase") == "Failed", 60)
        kube.jobs.hold("train")  # its pod runs (an empty log so far) until released
        await kube.kubectl.patch("DoppelUser", "rbac", {"spec": {"target": {"handle": "alice"}}})
        await kube.wait_for("rbac", lambda o: (o.get("status") or {}).get("phase") == "Training", 120)
        for _ in range(150):
            if ("", "pods/log", "get") in kube.cluster.operator_requests():
                break
            await asyncio.sleep(0.2)
        kube.jobs.release("train")
        await kube.wait_for(
            "rbac",
            lambda o: (
                (o.get("status") or {}).get("observedGeneration") == 2 and o["status"]["phase"] == "Failed"
            ),
            120,
            "train Job failed (no base model)",
        )
        await kube.kubectl.delete("DoppelUser", "rbac")
        for _ in range(300):
            if await kube.kubectl.get("DoppelUser", "rbac") is None:
                break
            await asyncio.sleep(0.2)
        assert await kube.kubectl.get("DoppelUser", "rbac") is None
    finally:
        await operator.stop()

    used = kube.cluster.operator_requests()
    # The run exercised the whole surface (a regression in recording would make this test vacuous).
    expected = {("batch", "jobs", "create"), ("doppel.dev", "doppelusers/status", "patch")}
    expected |= {("", "secrets", "get"), ("", "pods/log", "get"), ("kopf.dev", "kopfpeerings", "patch")}
    assert expected <= used
    denied = sorted(triple for triple in used if not allowed(rules, *triple))
    assert denied == [], f"the chart's operator Role does not grant: {denied}"
    # ...and it grants nothing more than the code uses: every rule was exercised, or is one of the few that
    # only a rarer path (or an API server's authorization of another call) needs.
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    unused = sorted(granted - used - set(SITUATIONAL))
    assert unused == [], f"the chart grants the operator what it never used: {unused}"
