"""OAuth stores for Bolt's AsyncApp: slack_sdk's sync stores (ours on Kubernetes, or its SQLAlchemy ones)
behind its async interfaces, plus an OAuth `state` store on Kubernetes so any replica can finish an install
that another one started."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from slack_sdk.oauth.installation_store import Bot, Installation, InstallationStore
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.state_store import OAuthStateStore
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore

from doppel.bot.kube import ANNOTATION_EXPIRES, REQUEST_TIMEOUT_S

LOG = logging.getLogger(__name__)


class AsyncInstallationStoreAdapter(AsyncInstallationStore):
    """slack_sdk's async installation-store interface over a sync store, run off the event loop."""

    def __init__(self, store: InstallationStore) -> None:
        self.store = store

    @property
    def logger(self) -> logging.Logger:
        return LOG

    async def async_save(self, installation: Installation) -> None:
        await asyncio.to_thread(self.store.save, installation)

    async def async_save_bot(self, bot: Bot) -> None:
        await asyncio.to_thread(self.store.save_bot, bot)

    async def async_find_bot(
        self, *, enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None = False
    ) -> Bot | None:
        return await asyncio.to_thread(
            lambda: self.store.find_bot(
                enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=is_enterprise_install
            )
        )

    async def async_find_installation(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None = None,
        is_enterprise_install: bool | None = False,
    ) -> Installation | None:
        return await asyncio.to_thread(
            lambda: self.store.find_installation(
                enterprise_id=enterprise_id,
                team_id=team_id,
                user_id=user_id,
                is_enterprise_install=is_enterprise_install,
            )
        )

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        await asyncio.to_thread(lambda: self.store.delete_bot(enterprise_id=enterprise_id, team_id=team_id))

    async def async_delete_installation(
        self, *, enterprise_id: str | None, team_id: str | None, user_id: str | None = None
    ) -> None:
        await asyncio.to_thread(
            lambda: self.store.delete_installation(
                enterprise_id=enterprise_id, team_id=team_id, user_id=user_id
            )
        )

    async def async_delete_all(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        await asyncio.to_thread(lambda: self.store.delete_all(enterprise_id=enterprise_id, team_id=team_id))


class AsyncStateStoreAdapter(AsyncOAuthStateStore):
    def __init__(self, store: OAuthStateStore) -> None:
        self.store = store

    @property
    def logger(self) -> logging.Logger:
        return LOG

    async def async_issue(self, *args: object, **kwargs: object) -> str:
        return await asyncio.to_thread(self.store.issue)

    async def async_consume(self, state: str) -> bool:
        return await asyncio.to_thread(self.store.consume, state)


class KubernetesOAuthStateStore(OAuthStateStore):
    """One ConfigMap per issued `state`; consuming deletes it, so a state is good once, until it expires."""

    def __init__(self, client: k8s.ApiClient, namespace: str, expiration_s: int = 600) -> None:
        self.core = k8s.CoreV1Api(client)
        self.namespace, self.expiration_s = namespace, expiration_s

    @property
    def logger(self) -> logging.Logger:
        return LOG

    def issue(self, *args: object, **kwargs: object) -> str:
        state = secrets.token_hex(16)
        body = {
            "metadata": {
                "name": f"doppel-oauth-state-{state}",
                "annotations": {ANNOTATION_EXPIRES: str(int(time.time() + self.expiration_s))},
            }
        }
        self.core.create_namespaced_config_map(self.namespace, body, _request_timeout=REQUEST_TIMEOUT_S)
        return state

    def consume(self, state: str) -> bool:
        if not state.isalnum() or len(state) > 64:
            return False
        name = f"doppel-oauth-state-{state.lower()}"
        try:
            found = self.core.read_namespaced_config_map(
                name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S
            )
            self.core.delete_namespaced_config_map(name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        expires = float((found.metadata.annotations or {}).get(ANNOTATION_EXPIRES, "0"))
        return expires >= time.time()
