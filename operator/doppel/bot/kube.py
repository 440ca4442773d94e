"""Kubernetes access for the bot: a workspace's DoppelUsers, its bot state, event claims.

Several workspaces may share a namespace (the chart puts them all beside the shared volume), so every
object of a workspace carries its team: DoppelUsers are listed by the team label and kept only when their
`spec.slack.teamId` (what the operator scrapes) says the same; the state ConfigMap is one per team.

The official `kubernetes` client is synchronous; calls run in a worker thread so the event loop (and
Slack's 3-second acknowledgement) never waits on the API server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

# Set by the bot when it finds the person deactivated in Slack (the operator reads it too: doppel.api).
from doppel.api import ANNOTATION_DEACTIVATED as ANNOTATION_DEACTIVATED
from doppel.api import GROUP, LABEL_TEAM, PLURAL, VERSION
from doppel.bot.logic import team_of

STATE_CONFIGMAP = "doppel-bot-state"
ANNOTATION_ENTERPRISE = "doppel.dev/slack-enterprise"
ANNOTATION_ORG_INSTALL = "doppel.dev/org-wide-install"
LABEL_EVENT = "doppel.dev/slack-event"
ANNOTATION_REQUESTER = "doppel.dev/requested-by"
ANNOTATION_NOTIFIED = "doppel.dev/notified-phase"
# Set with spec.suspend when the workspace uninstalled the app or revoked its token: why it stopped.
ANNOTATION_STOPPED = "doppel.dev/stopped"
ANNOTATION_EXPIRES = "doppel.dev/expires-at"
# The API server must answer well inside Slack's 3 s; a slow one is an error, not a hang.
REQUEST_TIMEOUT_S = 2.5

T = TypeVar("T")
LOG = logging.getLogger(__name__)


class AlreadyExists(Exception):
    """Create refused with 409: the object is there already."""


def state_configmap(team_id: str) -> str:
    """The ConfigMap holding workspace `team_id`'s bot state (its active doppel)."""
    return f"{STATE_CONFIGMAP}-{team_id.lower()}"


def token_secret(base: str, team_id: str) -> str:
    """The Secret holding workspace `team_id`'s bot token, which its scrape Jobs read."""
    return f"{base}-{team_id.lower()}"


def api_client(server: str | None = None, connections: int = 16) -> k8s.ApiClient:
    """A client for `server` (tests: the kmock emulator), else in-cluster, else $KUBECONFIG."""
    if server:
        configuration = k8s.Configuration()
        configuration.host = server
        configuration.verify_ssl = False
    else:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()
        configuration = k8s.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = connections  # as many as `Kube`'s threads
    return k8s.ApiClient(configuration)


class Kube:
    """The few Kubernetes calls the bot makes, each bounded by a timeout."""

    def __init__(self, client: k8s.ApiClient, threads: int = 16, namespaces: tuple[str, ...] = ()) -> None:
        self.custom = k8s.CustomObjectsApi(client)
        # Where list_all_doppels and watch_doppels look: these namespaces only (a Role there is enough),
        # or, empty, the whole cluster (a ClusterRole).
        self.namespaces = namespaces
        self.core = k8s.CoreV1Api(client)
        # Its own threads: a burst of mentions must not wait on asyncio's small default pool.
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="doppel-kube")

    async def _call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(func, *args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def _maybe(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """The call's result, or None on 404."""
        try:
            return await self._call(func, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # --- DoppelUsers -----------------------------------------------------------------------------
    async def list_doppels(self, namespace: str, team_id: str) -> list[dict[str, Any]]:
        """The DoppelUsers of workspace `team_id` in `namespace`, by name."""
        found = await self._maybe(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            label_selector=f"{LABEL_TEAM}={team_id}",
        )
        items = [item for item in (found or {}).get("items", []) if team_of(item) == team_id]
        return sorted(items, key=lambda item: item["metadata"]["name"])

    async def get_doppel(self, namespace: str, team_id: str, name: str) -> dict[str, Any] | None:
        """DoppelUser `name`, or None when there is none of workspace `team_id`."""
        found = await self._maybe(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )
        return found if found is not None and team_of(found) == team_id else None

    async def create_doppel(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._call(
                self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, body
            )
        except ApiException as exc:
            if exc.status == 409:
                raise AlreadyExists(body["metadata"]["name"]) from None
            raise

    async def delete_doppel(self, namespace: str, name: str) -> bool:
        deleted = await self._maybe(
            self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )
        return deleted is not None

    async def annotate_doppel(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        patch = {"metadata": {"annotations": annotations}}
        await self._maybe(
            self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, patch
        )

    async def stop_doppel(self, namespace: str, name: str, why: str) -> None:
        """Suspend a DoppelUser (the operator starts no Job for it) and say why on it."""
        patch = {"metadata": {"annotations": {ANNOTATION_STOPPED: why}}, "spec": {"suspend": True}}
        await self._maybe(
            self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, patch
        )

    async def resume_doppel(self, namespace: str, name: str) -> None:
        """Undo `stop_doppel`: the operator may start Jobs again."""
        patch = {"metadata": {"annotations": {ANNOTATION_STOPPED: None}}, "spec": {"suspend": False}}
        await self._maybe(
            self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, patch
        )

    async def list_all_doppels(self) -> list[dict[str, Any]]:
        if not self.namespaces:
            found = await self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
            return list(found.get("items", []))
        items: list[dict[str, Any]] = []
        for namespace in self.namespaces:
            found = await self._call(
                self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
            )
            items += found.get("items", [])
        return items

    def watch_doppels(self, on_change: Callable[[], object]) -> Callable[[], None]:
        """Call `on_change` (from a thread of its own per watched namespace, or one for the cluster) on
        every DoppelUser event; returns the stopper."""
        stopped = threading.Event()
        current: dict[str | None, k8s_watch.Watch] = {}  # the open watch of each thread

        def run(namespace: str | None) -> None:
            while not stopped.is_set():
                watch = k8s_watch.Watch()
                current[namespace] = watch
                if namespace is None:
                    lister, args = self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
                else:
                    lister = self.custom.list_namespaced_custom_object
                    args = (GROUP, VERSION, namespace, PLURAL)
                try:
                    events = watch.stream(lister, *args, _request_timeout=(5, 300))
                    for _ in events:
                        if stopped.is_set():
                            return
                        on_change()
                except Exception as exc:  # the API server went away or ended the watch: start again
                    LOG.debug("DoppelUser watch ended: %s", exc)
                stopped.wait(1.0)

        def stop() -> None:
            stopped.set()
            for watch in list(current.values()):
                watch.stop()  # closes the connection, so the thread is not left blocked on a read

        for namespace in self.namespaces or (None,):
            threading.Thread(target=run, args=(namespace,), name="doppel-bot-watch", daemon=True).start()
        return stop

    # --- per-workspace bot state (the active doppel) ---------------------------------------------
    async def get_state(self, namespace: str, team_id: str) -> dict[str, str]:
        name = state_configmap(team_id)
        found = await self._maybe(self.core.read_namespaced_config_map, name, namespace)
        if found is None or (found.metadata.labels or {}).get(LABEL_TEAM) != team_id:
            return {}
        return dict(found.data or {})

    async def set_state(self, namespace: str, team_id: str, data: dict[str, str]) -> None:
        name = state_configmap(team_id)
        meta = {"name": name, "namespace": namespace, "labels": {LABEL_TEAM: team_id}}
        body = {"metadata": meta, "data": data}
        if await self._maybe(self.core.patch_namespaced_config_map, name, namespace, body) is None:
            await self._call(self.core.create_namespaced_config_map, namespace, body)

    # --- the workspace's token, for its scrape Jobs ------------------------------------------------
    async def delete_secret(self, namespace: str, name: str, team_id: str) -> bool:
        """Delete the workspace's token Secret `name`, if it is that workspace's; whether one went."""
        found = await self._maybe(self.core.read_namespaced_secret, name, namespace)
        if found is None or (found.metadata.labels or {}).get(LABEL_TEAM) != team_id:
            return False
        return await self._maybe(self.core.delete_namespaced_secret, name, namespace) is not None

    async def put_secret(self, namespace: str, name: str, data: dict[str, str], team_id: str) -> None:
        body = {
            "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_TEAM: team_id}},
            "type": "Opaque",
            "stringData": data,
        }
        if await self._maybe(self.core.patch_namespaced_secret, name, namespace, body) is None:
            await self._call(self.core.create_namespaced_secret, namespace, body)

    # --- labelled ConfigMaps of the bot's own (mentions held for a cold pool: doppel.bot.held) ---------
    async def create_configmap(
        self, namespace: str, name: str, labels: dict[str, str], data: dict[str, str]
    ) -> bool:
        """Create ConfigMap `name`: True if this call created it, False if it existed (atomic)."""
        body = {"metadata": {"name": name, "namespace": namespace, "labels": labels}, "data": data}
        try:
            await self._call(self.core.create_namespaced_config_map, namespace, body, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def list_configmaps(self, namespace: str, selector: str) -> list[dict[str, str]]:
        """The data of the ConfigMaps matching label `selector` (`key=value`)."""
        key, _, value = selector.partition("=")
        found = await self._call(self.core.list_namespaced_config_map, namespace, label_selector=selector)
        return [
            dict(item.data or {}) for item in found.items if (item.metadata.labels or {}).get(key) == value
        ]

    async def delete_configmap(self, namespace: str, name: str) -> bool:
        """Delete ConfigMap `name`: True if this call deleted it, False if it was gone (atomic)."""
        return await self._maybe(self.core.delete_namespaced_config_map, name, namespace) is not None

    async def read_configmap(self, namespace: str, name: str) -> tuple[dict[str, str], str] | None:
        """ConfigMap `name`'s data and resourceVersion, or None if there is none."""
        found = await self._maybe(self.core.read_namespaced_config_map, name, namespace)
        return None if found is None else (dict(found.data or {}), found.metadata.resource_version)

    async def configmaps_with_versions(
        self, namespace: str, selector: str
    ) -> dict[str, tuple[dict[str, str], str]]:
        """name -> (data, resourceVersion) of the ConfigMaps matching label `selector` (`key=value`)."""
        key, _, value = selector.partition("=")
        found = await self._call(self.core.list_namespaced_config_map, namespace, label_selector=selector)
        return {
            item.metadata.name: (dict(item.data or {}), item.metadata.resource_version)
            for item in found.items
            if (item.metadata.labels or {}).get(key) == value
        }

    async def change_configmap(
        self, namespace: str, name: str, changes: dict[str, str | None], version: str
    ) -> bool:
        """Merge `changes` into ConfigMap `name`'s data (None removes a key) if it is still at resourceVersion
        `version`: False if it changed meanwhile (409) or is gone (404), and nothing was written."""
        body = {"metadata": {"resourceVersion": version}, "data": changes}
        try:
            await self._call(
                self.core.patch_namespaced_config_map, name, namespace, body, _preload_content=False
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    # --- event claims of earlier versions (one ConfigMap per event): swept once expired ---------------
    async def expire_claims(self, namespace: str, now: float) -> int:
        """Delete the per-event claims past their expiry (doppel.bot.ledger keeps claims in a fixed set of
        ConfigMaps now); returns how many went. Listed by label: the namespace's other ConfigMaps are never
        read."""
        found = await self._call(
            self.core.list_namespaced_config_map, namespace, label_selector=f"{LABEL_EVENT}=seen"
        )
        gone = 0
        for item in found.items:
            meta = item.metadata
            if (meta.labels or {}).get(LABEL_EVENT) != "seen":
                continue
            if float((meta.annotations or {}).get(ANNOTATION_EXPIRES, "0")) < now:
                await self._maybe(self.core.delete_namespaced_config_map, meta.name, namespace)
                gone += 1
        return gone
