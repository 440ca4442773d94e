"""Multi-workspace OAuth wiring: the install and redirect paths, the installation store (Kubernetes
Secrets, or slack_sdk's SQLAlchemy store when a database is configured), the signed OAuth state (nothing
stored per request), and Bolt's OAuth flow and authorize over the bot's own Slack client (token rotation
included). Only the workspaces of the install allowlist (`bot.installAllowlist`, or "any") can complete an
install: any other gets a refusal page, and the token Slack just issued is revoked. A stored install calls
`on_installed` (the doppels an uninstall stopped resume).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from kubernetes import client as k8s
from slack_bolt.authorization.async_authorize import AsyncInstallationStoreAuthorize
from slack_bolt.error import BoltError
from slack_bolt.oauth.async_callback_options import AsyncFailureArgs
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.oauth.installation_store import Installation, InstallationStore
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot.config import DEFAULT_SCOPES, BotConfig
from doppel.bot.installation_store import KubernetesSecretInstallationStore
from doppel.bot.stores import AsyncInstallationStoreAdapter, SignedOAuthStateStore

LOG = logging.getLogger(__name__)
INSTALL_PATH, REDIRECT_PATH = "/slack/install", "/slack/oauth_redirect"


REFUSED_PAGE = (
    "<html><body><h1>doppel cannot be installed in this workspace</h1>"
    "<p>Its operator allows installs only in the workspaces they list. Nothing was stored.</p></body></html>"
)


OnInstalled = Callable[[Installation], Awaitable[None]]


class InstallRefused(BoltError):
    """An install by a workspace (or Grid org) the allowlist does not name."""


class AllowlistOAuthFlow(AsyncOAuthFlow):
    """Bolt's OAuth flow, storing an installation only when `config.may_install` allows its workspace; any
    other gets `REFUSED_PAGE` (403) and the token it was just issued is revoked (the app leaves it). Once
    stored, `on_installed` is told."""

    def __init__(
        self,
        *,
        config: BotConfig,
        client: AsyncWebClient,
        settings: AsyncOAuthSettings,
        on_installed: OnInstalled | None = None,
    ) -> None:
        super().__init__(client=client, settings=settings)
        self.config, self.on_installed = config, on_installed
        default_failure = self.failure_handler

        async def failure(args: AsyncFailureArgs) -> BoltResponse:
            if isinstance(args.error, InstallRefused):
                return BoltResponse(
                    status=403, body=REFUSED_PAGE, headers={"Content-Type": "text/html; charset=utf-8"}
                )
            return await default_failure(args)

        self.failure_handler = failure

    async def store_installation(self, request: AsyncBoltRequest, installation: Installation) -> None:
        if not self.config.may_install(installation.team_id, installation.enterprise_id):
            LOG.warning(
                "install by team %s (org %s) refused: not on the install allowlist",
                installation.team_id,
                installation.enterprise_id,
            )
            for token in {installation.bot_token, installation.user_token} - {None}:
                try:
                    await self.client.auth_revoke(token=token)
                except SlackApiError as exc:
                    LOG.warning("could not revoke the refused install's token: %s", exc.response.get("error"))
            raise InstallRefused("workspace not on the install allowlist")
        await super().store_installation(request, installation)
        if self.on_installed is not None:
            await self.on_installed(installation)


def oauth_wiring(
    config: BotConfig,
    web: AsyncWebClient,
    installation_store: InstallationStore | None,
    kube_client: Callable[[], k8s.ApiClient],
    on_installed: OnInstalled | None = None,
) -> tuple[AsyncInstallationStoreAdapter, AsyncOAuthFlow, AsyncInstallationStoreAuthorize]:
    """The installation store, OAuth flow and authorize of an OAuth `config` (`installation_store` when
    given, else the configured one); `on_installed` is called after each stored install."""
    assert config.client_secret is not None
    store = AsyncInstallationStoreAdapter(_installation_store(config, installation_store, kube_client))
    settings = AsyncOAuthSettings(
        client_id=config.client_id,
        client_secret=config.client_secret,
        scopes=list(DEFAULT_SCOPES),
        installation_store=store,
        state_store=SignedOAuthStateStore(config.client_secret),
        install_path=INSTALL_PATH,
        redirect_uri_path=REDIRECT_PATH,
        redirect_uri=config.oauth_redirect_uri,
        # Rotating tokens are refreshed this long before they expire (slack_sdk's TokenRotator).
        token_rotation_expiration_minutes=120,
    )
    flow = AllowlistOAuthFlow(config=config, client=web, settings=settings, on_installed=on_installed)
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
