"""The few Kubernetes API calls the operator makes itself (kopf does the watching and its own patches).

A thin httpx client built from the same `kopf.ConnectionInfo` kopf logged in with, so both talk to the
same server with the same credentials.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from typing import Any

import httpx
import kopf

from doppel.api import GROUP, PLURAL, VERSION
from doppel.operator.jobs import A_ABANDONED


def _pem(value: str | bytes) -> bytes:
    """kubeconfig `*-data` fields are base64 of PEM; accept PEM too."""
    raw = value.encode() if isinstance(value, str) else value
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _tls(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=_pem(info.ca_data).decode() if info.ca_data else None,
    )
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        # ssl only loads client certificates from files.
        with tempfile.NamedTemporaryFile() as cert_file, tempfile.NamedTemporaryFile() as key_file:
            cert_file.write(_pem(info.certificate_data))
            key_file.write(_pem(info.private_key_data))
            cert_file.flush()
            key_file.flush()
            context.load_cert_chain(cert_file.name, key_file.name)
    elif cert:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


class ApiRefused(Exception):
    """The API server refused a request (quota or RBAC 403, validation 422...): its own words."""

    def __init__(self, code: int, reason: str, message: str, causes: list[str]) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.causes = code, reason, message, causes

    @property
    def namespace_terminating(self) -> bool:
        return "NamespaceTerminating" in self.causes or "being terminated" in self.message


def _refused(response: httpx.Response) -> ApiRefused:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    causes = [str(c.get("type", "")) for c in (body.get("details") or {}).get("causes") or []]
    reason = str(body.get("reason") or response.reason_phrase)
    return ApiRefused(response.status_code, reason, str(body.get("message") or response.text[:500]), causes)


def _check(response: httpx.Response) -> None:
    """4xx answers are refusals to report (retrying the same request gets the same answer); 5xx raise as
    usual and the loop retries them."""
    if 400 <= response.status_code < 500:
        raise _refused(response)
    response.raise_for_status()


class KubeApi:
    def __init__(self, info: kopf.ConnectionInfo, timeout: float = 30.0) -> None:
        headers = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = httpx.BasicAuth(info.username, info.password or "") if info.username else None
        self._http = httpx.AsyncClient(
            base_url=info.server.rstrip("/"), headers=headers, auth=auth, verify=_tls(info), timeout=timeout
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        response = await self._http.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    async def pod_log(self, namespace: str, pod: str, container: str, tail_lines: int) -> str | None:
        """The last lines of a container's log; None while there is none to read (pod gone, container
        not started yet: the API server answers 404 or 400)."""
        response = await self._http.get(
            f"/api/v1/namespaces/{namespace}/pods/{pod}/log",
            params={"container": container, "tailLines": str(tail_lines)},
        )
        if response.status_code in (400, 404):
            return None
        response.raise_for_status()
        return response.text

    async def events_for(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        """The Events about one object (a Job's FailedCreate, a pod's FailedMount or TriggeredScaleUp)."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        response = await self._http.get(
            f"/api/v1/namespaces/{namespace}/events", params={"fieldSelector": selector}
        )
        _check(response)
        items = response.json().get("items") or []
        # Filtered here too: an API server (or emulator) that ignores the selector answers with them all.
        return [
            e
            for e in items
            if (e.get("involvedObject") or {}).get("kind") == kind
            and (e.get("involvedObject") or {}).get("name") == name
        ]

    async def create_job(self, manifest: dict[str, Any]) -> bool:
        """Create a Job; False when it exists already (deterministic names make that the idempotent path)."""
        namespace = manifest["metadata"]["namespace"]
        response = await self._http.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", json=manifest)
        if response.status_code == 409:
            return False
        _check(response)
        return True

    async def stop_job(self, namespace: str, name: str, reason: str) -> None:
        """Give a Job up: suspended (the Job controller deletes its pod, freeing what it requested) and
        annotated with why, so the Job stays as the record of a failed attempt."""
        patch = {"metadata": {"annotations": {A_ABANDONED: reason[:1000]}}, "spec": {"suspend": True}}
        response = await self._http.patch(
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            content=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if response.status_code != 404:
            _check(response)

    async def expire_job(self, namespace: str, name: str, ttl_s: int) -> None:
        """Set a finished Job's ttlSecondsAfterFinished (mutable): the TTL-after-finished controller
        deletes it, and its pods, that long after it ended (at once if that time is past); gone is fine."""
        response = await self._http.patch(
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            content=json.dumps({"spec": {"ttlSecondsAfterFinished": ttl_s}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if response.status_code != 404:
            _check(response)

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; gone already is fine."""
        response = await self._http.request(
            "DELETE",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
        )
        if response.status_code != 404:
            _check(response)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (nulls remove fields)."""
        response = await self._http.patch(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()

    async def namespace_terminating(self, namespace: str) -> bool:
        """True while the namespace is being deleted (or is gone)."""
        response = await self._http.get(f"/api/v1/namespaces/{namespace}")
        if response.status_code == 404:
            return True
        _check(response)
        body = response.json()
        return bool(body.get("metadata", {}).get("deletionTimestamp")) or (
            (body.get("status") or {}).get("phase") == "Terminating"
        )

    async def release_finalizer(self, namespace: str, finalizer: str) -> list[str]:
        """Remove `finalizer` from every DoppelUser in the namespace; the names it was removed from."""
        response = await self._http.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}")
        _check(response)
        released = []
        for item in response.json().get("items") or []:
            meta = item.get("metadata") or {}
            finalizers = list(meta.get("finalizers") or [])
            if finalizer not in finalizers:
                continue
            patch = {"metadata": {"finalizers": [f for f in finalizers if f != finalizer]}}
            done = await self._http.patch(
                f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{meta['name']}",
                content=json.dumps(patch),
                headers={"Content-Type": "application/merge-patch+json"},
            )
            if done.status_code != 404:
                _check(done)
                released.append(str(meta["name"]))
        return released

    async def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        """Merge-patch the spec (a new generation: the API server bumps metadata.generation)."""
        response = await self._http.patch(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
            content=json.dumps({"spec": spec}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
