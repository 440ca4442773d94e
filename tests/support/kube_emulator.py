"""The kmock Kubernetes emulator as doppel's tests and benchmarks use it, and a user's view of it.

- `Emulator`: kmock's `KubernetesEmulator` plus the API-server duties doppel relies on (names from
  generateName, a new generation on spec changes, resourceVersions with 409 on a stale one and 422 on a
  JSON patch whose `test` fails (kopf's optimistic concurrency), refusals such as
  quotas, a Terminating namespace refusing new content), objects found by key, and, unrecorded, requests and
  deleted objects forgotten (a benchmark's thousands of them).
- `KubeCluster`: that emulator served over HTTP on loopback with the resources doppel uses declared (the
  DoppelUser CRD, Jobs, pods, Secrets, ConfigMaps, Events, namespaces...). Every request is recorded;
  `operator_requests()` gives the operator's own as RBAC triples.
- `Kubectl`: acts like a user; it fills in what a real API server would at creation (uid, generation,
  creationTimestamp).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import jsonpointer
import kmock
import yaml

from doppel.api import GROUP, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[2]
TEST_AGENT = "doppel-tests"
NAMESPACE = "team"

# (group/version/plural, kind, namespaced, subresources)
RESOURCES: list[tuple[str, str, bool, tuple[str, ...]]] = [
    (f"{GROUP}/{VERSION}/{PLURAL}", "DoppelUser", True, ("status",)),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, ()),
    ("v1/namespaces", "Namespace", False, ()),
    ("v1/events", "Event", True, ()),
    ("v1/pods", "Pod", True, ("status", "log")),
    ("v1/secrets", "Secret", True, ()),
    ("v1/configmaps", "ConfigMap", True, ()),
    ("batch/v1/jobs", "Job", True, ("status",)),
    # kopf's peering objects: replicas record themselves there and only the highest priority acts.
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, ()),
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, ()),
]
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _path(api_version: str, plural: str, namespace: str | None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


PLURALS = {
    "DoppelUser": PLURAL,
    "Job": "jobs",
    "Pod": "pods",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "Namespace": "namespaces",
    "Event": "events",
    "KopfPeering": "kopfpeerings",
    "ClusterKopfPeering": "clusterkopfpeerings",
}
API_VERSIONS = {
    "DoppelUser": f"{GROUP}/{VERSION}",
    "Job": "batch/v1",
    "KopfPeering": "kopf.dev/v1",
    "ClusterKopfPeering": "kopf.dev/v1",
}


class Kubectl:
    """A user's view of the API: create/get/patch/delete over HTTP, as kubectl would."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, headers={"User-Agent": TEST_AGENT}, timeout=30)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        # What the API server fills in (kmock stores the body as sent).
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", _now())
        meta.setdefault("resourceVersion", "1")
        path = _path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"))
        response = await self.http.post(path, json=obj)
        response.raise_for_status()
        return dict(response.json())

    async def get(self, kind: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.get(_path(api, PLURALS[kind], namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    async def list(self, kind: str, namespace: str | None = NAMESPACE) -> list[dict[str, Any]]:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.get(_path(api, PLURALS[kind], namespace))
        response.raise_for_status()
        return list(response.json()["items"])

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = NAMESPACE) -> None:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.patch(
            _path(api, PLURALS[kind], namespace, name),
            content=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()

    async def patch_status(
        self, kind: str, name: str, status: dict[str, Any], namespace: str = NAMESPACE
    ) -> None:
        api = {"Job": "batch/v1"}.get(kind, "v1")
        response = await self.http.patch(
            _path(api, PLURALS[kind], namespace, name) + "/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()

    async def delete(self, kind: str, name: str, namespace: str | None = NAMESPACE) -> None:
        api = API_VERSIONS.get(kind, "v1")
        response = await self.http.delete(_path(api, PLURALS[kind], namespace, name))
        response.raise_for_status()

    async def secret(self, name: str, data: dict[str, str], namespace: str = NAMESPACE) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        await self.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace},
                "data": encoded,
            }
        )

    async def events(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        response = await self.http.get(_path("v1", "events", namespace))
        response.raise_for_status()
        return list(response.json()["items"])


@dataclass
class Refusal:
    """The API server refusing to create a kind of object (ResourceQuota: 403; validation, an admission
    webhook: 422), in its own words; `{name}` in the message becomes the object's name."""

    plural: str
    code: int
    reason: str
    message: str
    refused: int = 0  # how many requests it refused so far


# What kube-apiserver answers, word for word, for the refusals a cluster commonly gives.
QUOTA_MESSAGE = (
    'jobs.batch "{name}" is forbidden: exceeded quota: team-quota, requested: count/jobs.batch=1, '
    "used: count/jobs.batch=10, limited: count/jobs.batch=10"
)
INVALID_MESSAGE = (
    'Job.batch "{name}" is invalid: spec.template.spec.containers[0].resources.limits[nvidia.com/gpu]: '
    'Invalid value: "1": must be equal to requests'
)


class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator, plus the API-server duties doppel relies on: names from generateName (kopf's
    Events), a new metadata.generation on every spec change, refusals (`refusals`: quota, validation),
    and a Terminating namespace refusing every create (the NamespaceLifecycle admission plugin).

    With `record=False` it forgets requests once served: kmock matches each request against its whole
    request history, which grows quadratic under a benchmark's thousands of requests."""

    record: bool = True
    _inflight: set[int] | None = None
    refusals: list[Refusal] | None = None
    terminating: set[str] | None = None  # namespaces being deleted
    _written: int | None = None  # writes so far: the last resourceVersion given

    def _refuse(self, request: Any) -> None:
        meta = request.data.get("metadata") or {}
        name, namespace = meta.get("name") or "", request.namespace or meta.get("namespace")
        plural = request.resource.plural if request.resource is not None else ""
        if namespace and namespace in (self.terminating or set()):
            message = f"unable to create new content in namespace {namespace} because it is being terminated"
            cause = {"type": "NamespaceTerminating", "message": message, "field": "metadata.namespace"}
            raise kmock.KubernetesError(
                status=403,
                reason="Forbidden",
                message=f'{plural} "{name}" is forbidden: {message}',
                details={"name": name, "kind": plural, "causes": [cause]},
            )
        for refusal in self.refusals or []:
            if refusal.plural == plural:
                refusal.refused += 1
                raise kmock.KubernetesError(
                    status=refusal.code,
                    reason=refusal.reason,
                    message=refusal.message.format(name=name),
                    details={"name": name, "kind": plural},
                )

    async def _handle(self, request: Any) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            self._refuse(request)
            meta.setdefault("creationTimestamp", _now())  # the API server's, on every object
        key = (request.resource, request.namespace, request.name)
        self._version(request, key)
        self._json_patch(request, key)
        changes_spec = isinstance(request.data, dict) and "spec" in request.data and not request.subresource
        if request.action == kmock.action.UPDATE and changes_spec and key in self.objects:
            # As the API server does: every spec change is a new generation.
            generation = int((self.objects[key].get("metadata") or {}).get("generation") or 1)
            request.data.setdefault("metadata", {})["generation"] = generation + 1
        if self.record:
            return await super()._handle(request)
        if self._inflight is None:
            self._inflight = set()
        self._inflight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self._inflight]
        try:
            return await super()._handle(request)
        finally:
            self._inflight.discard(id(request))
            self._forget_deleted(key)

    def _version(self, request: Any, key: tuple[Any, str | None, str | None]) -> None:
        """metadata.resourceVersion as the API server keeps it: a new one on every write, and a write that
        names one the object no longer has refused with 409 (optimistic concurrency)."""
        writes = (kmock.action.CREATE, kmock.action.UPDATE)
        if request.action not in writes or not isinstance(request.data, dict):
            return
        meta = request.data.setdefault("metadata", {})
        if request.action == kmock.action.UPDATE and meta.get("resourceVersion") and key in self.objects:
            current = self.objects[key]
            stored = None if current.deleted else (current.get("metadata") or {}).get("resourceVersion")
            if stored is not None and meta["resourceVersion"] != stored:
                plural = request.resource.plural if request.resource is not None else ""
                raise kmock.KubernetesError(
                    status=409,
                    reason="Conflict",
                    message=f'Operation cannot be fulfilled on {plural} "{request.name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                    details={"name": request.name, "kind": plural},
                )
        self._written = (self._written or 0) + 1
        meta["resourceVersion"] = str(self._written)

    def _json_patch(self, request: Any, key: tuple[Any, str | None, str | None]) -> None:
        """A JSON patch as the API server applies it: refused with 422 when one of its `test` operations fails
        (kopf tests the resourceVersion it read, and on a 422 patches again at its next cycle; kmock alone
        answers 500, which kopf retries with the same stale test for minutes), a new resourceVersion when it
        applies."""
        if (
            request.action != kmock.action.UPDATE
            or not isinstance(request.data, list)
            or key not in self.objects
        ):
            return
        current = self.objects[key]
        tests = [op for op in request.data if isinstance(op, dict) and op.get("op") == "test"]
        try:
            jsonpatch.JsonPatch(tests).apply(dict(current), in_place=False)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            plural = request.resource.plural if request.resource is not None else ""
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message=f"the server rejected our request due to an error in our request: {exc}",
                details={"name": request.name, "kind": plural},
            ) from None
        self._written = (self._written or 0) + 1
        request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(self._written)})

    def _forget_deleted(self, key: tuple[Any, str | None, str | None]) -> None:
        """Unrecorded, a deleted object goes with its history (a benchmark deletes thousands of Jobs), and a
        live one keeps only its current version (kmock keeps every version of every object)."""
        if key[0] is None or key[2] is None or key not in self.objects:
            return
        obj = self.objects[key]
        if obj.deleted:
            del self.objects[key]
        elif len(obj.history) > 1:
            del obj.history[:-1]

    # kmock finds the object a request names by scanning every object it holds (a quadratic cost under a
    # benchmark's thousands of objects): by key instead, with the same answers.
    def _named(self, resource: Any, namespace: str | None, name: str | None) -> Any:
        key = (resource, namespace, name)
        return self.objects[key] if key in self.objects else None  # noqa: SIM401 (ObjectsArray has no get)

    async def _serve_fetch(self, request: Any) -> Any:
        obj = self._named(request.resource, request.namespace, request.name)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request: Any) -> Any:
        meta = request.data.get("metadata", {})
        namespace, name = request.namespace or meta.get("namespace"), request.name or meta.get("name")
        return self._named(request.resource, namespace, name).last.raw

    async def _serve_update(self, request: Any) -> Any:
        return self._named(request.resource, request.namespace, request.name).last.raw

    _serve_delete = _serve_update


class KubeCluster:
    """kmock's Kubernetes emulator on a loopback port, with doppel's resources declared."""

    def __init__(self, *, record: bool = True) -> None:
        self.emulator = Emulator()
        self.emulator.record = record
        self.emulator.refusals, self.emulator.terminating = [], set()
        for key, kind, namespaced, subresources in RESOURCES:
            self.emulator.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources
            )
        self._server: kmock.Server | None = None
        self.kubectl: Kubectl
        # (namespace, pod) -> (container, file holding its output): what the kubelet would serve as logs.
        self.pod_logs: dict[tuple[str, str], tuple[str, Path]] = {}
        pods = kmock.resource("", "v1", "pods")
        self.emulator[pods][kmock.subresource("log")] << self._serve_log

    def _serve_log(self, request: Any) -> bytes:
        """GET pods/NAME/log: the container's output so far, the last `tailLines` lines if asked."""
        found = self.pod_logs.get((request.namespace, request.name))
        if found is None:
            raise kmock.KubernetesObjectNotFoundError()
        container, path = found
        if request.params.get("container", container) != container:
            raise kmock.KubernetesObjectNotFoundError()
        lines = path.read_bytes().splitlines(keepends=True) if path.exists() else []
        tail = request.params.get("tailLines")
        return b"".join(lines[max(0, len(lines) - int(tail)) :] if tail is not None else lines)

    def refuse(self, plural: str, code: int, reason: str, message: str) -> Refusal:
        """Refuse every create of `plural` until `allow(refusal)`."""
        refusal = Refusal(plural, code, reason, message)
        assert self.emulator.refusals is not None
        self.emulator.refusals.append(refusal)
        return refusal

    def allow(self, refusal: Refusal) -> None:
        assert self.emulator.refusals is not None
        self.emulator.refusals.remove(refusal)

    def terminate_namespace(self, namespace: str = NAMESPACE) -> None:
        """`kubectl delete namespace`: the namespace turns Terminating and refuses new content, while the
        namespace controller deletes what is in it (the test deletes the objects it cares about)."""
        assert self.emulator.terminating is not None
        self.emulator.terminating.add(namespace)
        namespaces = kmock.resource("", "v1", "namespaces")
        self.emulator.objects[namespaces, None, namespace] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "uid": str(uuid.uuid4()), "deletionTimestamp": _now()},
            "status": {"phase": "Terminating"},
        }

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.url).rstrip("/")

    async def start(self) -> None:
        # Entered as a context manager, kmock answers errors (404, 409) as Kubernetes Status objects.
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator)
        await self._server.__aenter__()
        self.kubectl = Kubectl(self.url)
        crd = yaml.safe_load((ROOT / "crds" / "doppelusers.yaml").read_text())
        await self.kubectl.http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
        # kmock cannot parse POST /api/v1/namespaces; put the namespace in place directly.
        namespaces = kmock.resource("", "v1", "namespaces")
        self.emulator.objects[namespaces, None, NAMESPACE] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "uid": str(uuid.uuid4())},
        }

    async def stop(self) -> None:
        await self.kubectl.aclose()
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)

    def jobs(self) -> list[dict[str, Any]]:
        """Every Job the emulator holds (read in memory, not over the API: not counted as a request)."""
        found = []
        for key in list(self.emulator.objects):
            resource, _, _ = key
            obj = self.emulator.objects[key]
            if resource.plural == "jobs" and not obj.deleted:
                found.append(json.loads(json.dumps(dict(obj.raw))))
        return found

    def operator_requests(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource[/subresource], verb) of every API request not made by the tests."""
        verbs = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}
        seen: set[tuple[str, str, str]] = set()
        for request in self.emulator:
            if request.headers.get("User-Agent", "").startswith(TEST_AGENT) or request.resource is None:
                continue
            if not request.resource.plural:
                continue  # API discovery: open to every authenticated client
            action = request.action.name if request.action is not None else ""
            verb = verbs.get(action) or {"PATCH": "patch", "PUT": "update"}.get(
                str(request.method.value).upper()
            )
            if verb is None:
                continue
            resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            seen.add((request.resource.group or "", resource, verb))
        return seen
