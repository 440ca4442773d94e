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

    async def create_job(self, manifest: dict[str, Any]) -> bool:
        """Create a Job; False when it exists already (deterministic names make that the idempotent path)."""
        namespace = manifest["metadata"]["namespace"]
        response = await self._http.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", json=manifest)
        if response.status_code == 409:
            return False
        response.raise_for_status()
        return True

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (nulls remove fields)."""
        response = await self._http.patch(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()

    async def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        """Merge-patch the spec (a new generation: the API server bumps metadata.generation)."""
        response = await self._http.patch(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
            content=json.dumps({"spec": spec}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
