"""slack_sdk installation store on Kubernetes Secrets: OAuth installs need no database on Kubernetes.

One Secret per installation, in the bot's namespace: `slack-install-<team>` for a plain workspace,
`slack-install-<enterprise>-<team>` for a workspace of an Enterprise Grid org, `slack-install-<enterprise>`
for an org-wide install. It holds the latest installation, the per-user installations and the bot.
Lookups are by the ids of a verified request, and a stored installation is only returned for the team
(and org) it was saved for.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from slack_sdk.oauth.installation_store import Bot, Installation, InstallationStore

from doppel.bot.kube import LABEL_TEAM, REQUEST_TIMEOUT_S

LOG = logging.getLogger(__name__)
LATEST, BOT = "installation-latest", "bot"


def secret_name(enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None) -> str:
    org_wide = bool(is_enterprise_install or not team_id)
    owner = enterprise_id if org_wide else team_id
    if not owner or not re.fullmatch(r"[A-Za-z0-9]+", owner):
        raise ValueError(f"not a Slack team or enterprise id: {owner!r}")
    if enterprise_id and not re.fullmatch(r"[A-Za-z0-9]+", enterprise_id):
        raise ValueError(f"not a Slack enterprise id: {enterprise_id!r}")
    prefix = f"{enterprise_id.lower()}-" if enterprise_id and not org_wide else ""
    return f"slack-install-{prefix}{owner.lower()}"


class KubernetesSecretInstallationStore(InstallationStore):
    """slack_sdk's sync interface; Bolt's AsyncApp takes it through `AsyncStoreAdapter`."""

    def __init__(self, client: k8s.ApiClient, namespace: str) -> None:
        self.core = k8s.CoreV1Api(client)
        self.namespace = namespace

    @property
    def logger(self) -> logging.Logger:
        return LOG

    # --- sync -----------------------------------------------------------------------------------
    def save(self, installation: Installation) -> None:
        entry = json.dumps(installation.__dict__)
        data = {LATEST: entry, BOT: json.dumps(installation.to_bot().__dict__)}
        if installation.user_id:
            data[f"installation-{installation.user_id}"] = entry
        self._merge(
            secret_name(installation.enterprise_id, installation.team_id, installation.is_enterprise_install),
            installation.team_id or installation.enterprise_id or "",
            data,
        )
        LOG.info("saved the installation of team %s", installation.team_id)

    def save_bot(self, bot: Bot) -> None:
        self._merge(
            secret_name(bot.enterprise_id, bot.team_id, bot.is_enterprise_install),
            bot.team_id or bot.enterprise_id or "",
            {BOT: json.dumps(bot.__dict__)},
        )

    def find_bot(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        is_enterprise_install: bool | None = False,
    ) -> Bot | None:
        data = self._entry(enterprise_id, team_id, is_enterprise_install, BOT)
        return Bot(**data) if data else None

    def find_installation(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None = None,
        is_enterprise_install: bool | None = False,
    ) -> Installation | None:
        key = f"installation-{user_id}" if user_id else LATEST
        data = self._entry(enterprise_id, team_id, is_enterprise_install, key)
        if data is None:
            return None
        if user_id:
            # The bot token may have been rotated since this user installed: take the latest bot.
            latest = self._entry(enterprise_id, team_id, is_enterprise_install, LATEST) or {}
            for field in ("bot_token", "bot_refresh_token", "bot_token_expires_at", "bot_id", "bot_user_id"):
                if field in latest:
                    data[field] = latest[field]
        return Installation(**data)

    def delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        self._drop(enterprise_id, team_id, [BOT])

    def delete_installation(
        self, *, enterprise_id: str | None, team_id: str | None, user_id: str | None = None
    ) -> None:
        keys = [f"installation-{user_id}"] if user_id else None
        self._drop(enterprise_id, team_id, keys)

    def delete_all(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        self._drop(enterprise_id, team_id, None)

    # --- Secrets ----------------------------------------------------------------------------------
    def _read(self, name: str) -> dict[str, str] | None:
        try:
            secret = self.core.read_namespaced_secret(
                name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}

    def _entry(
        self, enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None, key: str
    ) -> dict[str, Any] | None:
        stored = self._read(secret_name(enterprise_id, team_id, is_enterprise_install))
        if not stored or key not in stored:
            return None
        data: dict[str, Any] = json.loads(stored[key])
        # A Secret is only ever answered for the installation it was saved for: its org, and its workspace
        # unless it is the org's own (org-wide) installation.
        if (data.get("enterprise_id") or None) != (enterprise_id or None):
            return None
        if is_enterprise_install:
            return data if data.get("is_enterprise_install") else None
        return data if data.get("team_id") == team_id else None

    def _merge(self, name: str, owner: str, data: dict[str, str]) -> None:
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
        body = {
            "metadata": {"name": name, "namespace": self.namespace, "labels": {LABEL_TEAM: owner}},
            "type": "Opaque",
            "data": encoded,
        }
        try:
            self.core.patch_namespaced_secret(name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.core.create_namespaced_secret(self.namespace, body, _request_timeout=REQUEST_TIMEOUT_S)

    def _drop(self, enterprise_id: str | None, team_id: str | None, keys: list[str] | None) -> None:
        name = secret_name(enterprise_id, team_id, False)
        stored = self._read(name)
        if stored is None:
            return
        remaining = {k: v for k, v in stored.items() if keys is not None and k not in keys}
        if keys is None or not any(k.startswith("installation") for k in remaining):
            self.core.delete_namespaced_secret(name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S)
            return
        body = {
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in remaining.items()},
        }
        self.core.replace_namespaced_secret(name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT_S)
