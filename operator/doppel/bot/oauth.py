"""Multi-workspace OAuth wiring: the install and redirect paths, the installation store (Kubernetes
Secrets, or slack_sdk's SQLAlchemy store when a database is configured), the signed OAuth state, and
Bolt's OAuth flow and authorize over the bot's own Slack client (token rotation included).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kubernetes import client as k8s
from slack_bolt.authorization.async_authorize import AsyncInstallationStoreAuthorize
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_sdk.oauth.installation_store import InstallationStore
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot.config import DEFAULT_SCOPES, BotConfig
from doppel.bot.installation_store import KubernetesSecretInstallationStore
from doppel.bot.ledger import EventLedger
from doppel.bot.stores import AsyncInstallationStoreAdapter, SignedOAuthStateStore

LOG = logging.getLogger(__name__)
INSTALL_PATH, REDIRECT_PATH = "/slack/install", "/slack/oauth_redirect"


def oauth_wiring(
    config: BotConfig,
    web: AsyncWebClient,
    ledger: EventLedger,
    installation_store: InstallationStore | None,
    kube_client: Callable[[], k8s.ApiClient],
) -> tuple[AsyncInstallationStoreAdapter, AsyncOAuthFlow, AsyncInstallationStoreAuthorize]:
    """The installation store, OAuth flow and authorize of an OAuth `config` (`installation_store` when
    given, else the configured one)."""
    assert config.client_secret is not None
    store = AsyncInstallationStoreAdapter(_installation_store(config, installation_store, kube_client))
    settings = AsyncOAuthSettings(
        client_id=config.client_id,
        client_secret=config.client_secret,
        scopes=list(DEFAULT_SCOPES),
        installation_store=store,
        state_store=SignedOAuthStateStore(config.client_secret, ledger),
        install_path=INSTALL_PATH,
        redirect_uri_path=REDIRECT_PATH,
        redirect_uri=config.oauth_redirect_uri,
        # Rotating tokens are refreshed this long before they expire (slack_sdk's TokenRotator).
        token_rotation_expiration_minutes=120,
    )
    flow = AsyncOAuthFlow(client=web, settings=settings)
    # Bolt's default authorize rotates tokens through a client of its own (slack.com): use ours.
    authorize = AsyncInstallationStoreAuthorize(
        installation_store=store,
        client_id=config.client_id,
        client_secret=config.client_secret,
        client=web,
        token_rotation_expiration_minutes=settings.token_rotation_expiration_minutes,
        logger=LOG,
    )
    return store, flow, authorize


def _installation_store(
    config: BotConfig, installation_store: InstallationStore | None, kube_client: Callable[[], k8s.ApiClient]
) -> InstallationStore:
    if installation_store is not None:
        return installation_store
    if config.database_url:
        import sqlalchemy as sa
        from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore

        engine = sa.create_engine(config.database_url)
        sql_store = SQLAlchemyInstallationStore(client_id=config.client_id or "", engine=engine)
        sql_store.create_tables()
        return sql_store
    return KubernetesSecretInstallationStore(kube_client(), config.bot_namespace)
