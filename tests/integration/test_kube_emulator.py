"""The Kubernetes API emulator answers a JSON patch as the API server does: kopf's optimistic concurrency
(a `test` of the resourceVersion it read, then its changes) is refused with 422 when the object moved on,
which kopf takes as "patch again at the next cycle"; a 500 there made kopf retry the same stale patch for
minutes while the DoppelUser's handlers waited."""

from __future__ import annotations

import json

from tests.support.kube_fixtures import NAMESPACE

JSON_PATCH = {"Content-Type": "application/json-patch+json"}


async def test_a_json_patch_testing_a_stale_resource_version_is_refused_with_422_and_changes_nothing(kube):
    await kube.kubectl.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": NAMESPACE}}
    )
    read = await kube.kubectl.get("ConfigMap", "cm")
    assert read is not None
    await kube.kubectl.patch("ConfigMap", "cm", {"data": {"moved": "on"}})  # someone else writes
    url = f"/api/v1/namespaces/{NAMESPACE}/configmaps/cm"
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": read["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/metadata/finalizers", "value": ["doppel.dev/cleanup"]},
    ]
    refused = await kube.kubectl.http.patch(url, content=json.dumps(stale), headers=JSON_PATCH)
    assert refused.status_code == 422 and refused.json()["reason"] == "Invalid"
    unchanged = await kube.kubectl.get("ConfigMap", "cm")
    assert unchanged is not None and "finalizers" not in unchanged["metadata"]

    fresh = [{**stale[0], "value": unchanged["metadata"]["resourceVersion"]}, stale[1]]
    applied = await kube.kubectl.http.patch(url, content=json.dumps(fresh), headers=JSON_PATCH)
    assert applied.status_code == 200, applied.text
    now = await kube.kubectl.get("ConfigMap", "cm")
    assert now is not None and now["metadata"]["finalizers"] == ["doppel.dev/cleanup"]
    assert (
        now["metadata"]["resourceVersion"] != unchanged["metadata"]["resourceVersion"]
    )  # a write: a new one
