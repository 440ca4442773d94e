"""OAuth stores for Bolt's AsyncApp: slack_sdk's sync installation stores (ours on Kubernetes, or its
SQLAlchemy one) behind its async interface, plus a signed OAuth `state` store, so any replica can finish an
install that another one started, and no unauthenticated request stores anything."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict

from slack_sdk.oauth.installation_store import Bot, Installation, InstallationStore
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore

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
    secret. Neither issuing nor checking one stores anything shared: `GET /slack/install` and
    `GET /slack/oauth_redirect` are public, and an object per request (a ConfigMap per redirect, as the
    event ledger's claims were) would let anyone fill the cluster. Any replica checks a state another one
    issued. A state is good once per replica (its nonce kept in memory, at most `max_used` of them, until
    it expires); replaying one elsewhere gains nothing: the code it came with is single-use at Slack."""

    def __init__(self, secret: str, expiration_s: int = 600, max_used: int = 10_000) -> None:
        self._key = hashlib.sha256(f"doppel-oauth-state:{secret}".encode()).digest()
        self.expiration_s, self.max_used = expiration_s, max_used
        self._used: OrderedDict[str, int] = OrderedDict()  # nonce -> expiry, oldest first

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
        nonce, expiry = body[:32], int(body[32:])
        now = time.time()
        if not hmac.compare_digest(self._mac(body), mac) or expiry < now or nonce in self._used:
            return False
        while self._used and (next(iter(self._used.values())) < now or len(self._used) >= self.max_used):
            self._used.popitem(last=False)  # expired (issued in order), or the oldest past the bound
        self._used[nonce] = expiry
        return True
