"""Where the bot finds a workspace's doppels: the `Directory` interface, implemented on Kubernetes by
`doppel.bot.kube.Kube` and in memory by `MemoryDirectory` (one machine, no cluster: `doppel local`)."""

from __future__ import annotations

import copy
from typing import Any, Protocol

from doppel.bot.kube import ANNOTATION_STOPPED, AlreadyExists
from doppel.bot.logic import team_of


class Directory(Protocol):
    """Every read is of one workspace (`team_id`): several may share a namespace."""

    async def list_doppels(self, namespace: str, team_id: str) -> list[dict[str, Any]]: ...
    async def get_doppel(self, namespace: str, team_id: str, name: str) -> dict[str, Any] | None: ...
    async def create_doppel(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...
    async def delete_doppel(self, namespace: str, name: str) -> bool: ...
    async def annotate_doppel(self, namespace: str, name: str, annotations: dict[str, str]) -> None: ...
    async def list_all_doppels(self) -> list[dict[str, Any]]: ...
    async def get_state(self, namespace: str, team_id: str) -> dict[str, str]: ...
    async def set_state(self, namespace: str, team_id: str, data: dict[str, str]) -> None: ...
    async def put_secret(self, namespace: str, name: str, data: dict[str, str], team_id: str) -> None: ...
    async def delete_secret(self, namespace: str, name: str, team_id: str) -> bool: ...
    async def stop_doppel(self, namespace: str, name: str, why: str) -> None: ...
    async def resume_doppel(self, namespace: str, name: str) -> None: ...


class MemoryDirectory:
    """DoppelUser-shaped dicts kept in this process. The embedded mode adds its trained doppels with
    `add(...)`; objects created by `/doppel train` stay Pending, since no operator runs here. A doppel
    added without a team (`doppel local` trains before it knows the token's team) belongs to whichever
    workspace the one-workspace bot serves."""

    def __init__(self) -> None:
        self.doppels: dict[tuple[str, str], dict[str, Any]] = {}
        self.state: dict[tuple[str, str], dict[str, str]] = {}

    @staticmethod
    def _ours(doppel: dict[str, Any], team_id: str) -> bool:
        return team_of(doppel) in (team_id, None)

    def add(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.doppels[meta["namespace"], meta["name"]] = copy.deepcopy(body)

    async def list_doppels(self, namespace: str, team_id: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(d)
            for (ns, _), d in sorted(self.doppels.items())
            if ns == namespace and self._ours(d, team_id)
        ]

    async def get_doppel(self, namespace: str, team_id: str, name: str) -> dict[str, Any] | None:
        found = self.doppels.get((namespace, name))
        return copy.deepcopy(found) if found and self._ours(found, team_id) else None

    async def create_doppel(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if (namespace, body["metadata"]["name"]) in self.doppels:
            raise AlreadyExists(body["metadata"]["name"])
        self.add({**body, "metadata": {**body["metadata"], "namespace": namespace}})
        return copy.deepcopy(body)

    async def delete_doppel(self, namespace: str, name: str) -> bool:
        return self.doppels.pop((namespace, name), None) is not None

    async def annotate_doppel(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        found = self.doppels.get((namespace, name))
        if found is not None:
            found["metadata"].setdefault("annotations", {}).update(annotations)

    async def stop_doppel(self, namespace: str, name: str, why: str) -> None:
        found = self.doppels.get((namespace, name))
        if found is not None:
            found["metadata"].setdefault("annotations", {})[ANNOTATION_STOPPED] = why
            found["spec"]["suspend"] = True

    async def resume_doppel(self, namespace: str, name: str) -> None:
        found = self.doppels.get((namespace, name))
        if found is not None:
            found["metadata"].get("annotations", {}).pop(ANNOTATION_STOPPED, None)
            found["spec"]["suspend"] = False

    async def list_all_doppels(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(d) for _, d in sorted(self.doppels.items())]

    async def get_state(self, namespace: str, team_id: str) -> dict[str, str]:
        return dict(self.state.get((namespace, team_id), {}))

    async def set_state(self, namespace: str, team_id: str, data: dict[str, str]) -> None:
        self.state.setdefault((namespace, team_id), {}).update(data)

    async def put_secret(self, namespace: str, name: str, data: dict[str, str], team_id: str) -> None:
        """Nothing to store: in-process stages are handed the token directly."""

    async def delete_secret(self, namespace: str, name: str, team_id: str) -> bool:
        return False
