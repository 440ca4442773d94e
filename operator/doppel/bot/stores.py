"""OAuth stores for Bolt's AsyncApp: slack_sdk's sync installation stores (ours on Kubernetes, or its
SQLAlchemy one) behind its async interface, plus a signed OAuth `state` store, so any replica can finish an
install that another one started."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time

from slack_sdk.oauth.installation_store import Bot, Installation, InstallationStore
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore

from doppel.bot.ledger import EventLedger

LOG = logging.getLogger(__name__)
_STATE = re.compile(r"[0-9a-f]{74}")  # nonce (32) + expiry (10 digits) + signature (32)


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


class SignedOAuthStateStore(AsyncOAuthStateStore):
    """OAuth `state` values that carry their own proof: a nonce and an expiry, signed with the app's client
    secret. Issuing one stores nothing, so `GET /slack/install` (public) creates no object however often it
    is called, and any replica can check a state another one issued. Consuming one claims its nonce in the
    event ledger (atomic, shared, swept when expired), so a state is good once."""

    def __init__(self, secret: str, ledger: EventLedger, expiration_s: int = 600) -> None:
        self._key = hashlib.sha256(f"doppel-oauth-state:{secret}".encode()).digest()
        self.ledger, self.expiration_s = ledger, expiration_s

    @property
    def logger(self) -> logging.Logger:
        return LOG

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[:32]

    async def async_issue(self, *args: object, **kwargs: object) -> str:
        body = f"{secrets.token_hex(16)}{int(time.time()) + self.expiration_s:010d}"
        return body + self._mac(body)

    async def async_consume(self, state: str) -> bool:
        if not _STATE.fullmatch(state):
            return False
        body, mac = state[:42], state[42:]
        if not hmac.compare_digest(self._mac(body), mac) or int(body[32:]) < time.time():
            return False
        return await self.ledger.claim("oauth", f"state/{body[:32]}")
