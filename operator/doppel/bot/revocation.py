"""A workspace takes the app back: `app_uninstalled` (the app removed) or `tokens_revoked` (its bot token
revoked). Its installation and its token Secret are deleted, and its doppels stopped (`spec.suspend`, with
the reason on them): nothing keeps a token Slack has taken back, and no scrape Job tries to use one.
Installed again (`on_installed`, from the OAuth flow; with one bot token and no OAuth, `on_start`: the bot
started with a token Slack accepts), the workspace gets its token Secret back and the doppels the
revocation stopped resume; those stopped before it (`spec.suspend` set by a person) stay so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.oauth.installation_store import Installation
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot.access import tenant_of
from doppel.bot.deps import Deps
from doppel.bot.kube import ANNOTATION_STOPPED, token_secret

LOG = logging.getLogger(__name__)
REVOCATIONS = ("app_uninstalled", "tokens_revoked")


async def on_revoked(
    deps: Deps,
    store: AsyncInstallationStore | None,
    body: dict[str, Any],
    event: dict[str, Any],
    context: AsyncBoltContext,
) -> None:
    """Forget the workspace's tokens and stop its doppels (a revocation of user tokens only: those go)."""
    why = str(event.get("type"))
    tenant = tenant_of(context, body)
    team = None if tenant.org_wide else tenant.team_id
    tokens = event.get("tokens") or {}
    if why == "tokens_revoked" and not tokens.get("bot"):
        for user_id in tokens.get("oauth") or []:
            if store is not None:
                await store.async_delete_installation(
                    enterprise_id=tenant.enterprise_id, team_id=team, user_id=user_id
                )
        return
    if store is not None:
        if why == "app_uninstalled":
            await store.async_delete_all(enterprise_id=tenant.enterprise_id, team_id=team)
        else:
            await store.async_delete_bot(enterprise_id=tenant.enterprise_id, team_id=team)
    namespace = deps.config.namespace_for(tenant.team_id)
    await deps.kube.delete_secret(
        namespace, token_secret(deps.config.token_secret, tenant.team_id), tenant.team_id
    )
    # Those suspended already stay unmarked: a reinstall must not resume what a person stopped.
    doppels = [d for d in await deps.kube.list_doppels(namespace, tenant.team_id) if not _suspended(d)]
    for doppel in doppels:
        await deps.kube.stop_doppel(namespace, doppel["metadata"]["name"], why)
    deps.snapshots.invalidate(namespace, tenant.team_id)
    LOG.warning("%s by team %s: its tokens deleted, %d doppels stopped", why, tenant.team_id, len(doppels))


async def on_installed(deps: Deps, installation: Installation) -> None:
    """The workspace installed the app (again): the doppels a revocation stopped get the new token Secret
    and resume. An org-wide install names no workspace: its doppels are left for `/doppel train` again."""
    team_id, token = installation.team_id, installation.bot_token
    if team_id and token:
        await restore(deps, team_id, token)


async def on_start(deps: Deps, client: AsyncWebClient, attempts: int = 5) -> None:
    """Single-token mode (`SLACK_BOT_TOKEN`, no OAuth) has no install to say the workspace took the app back:
    a restart with a token Slack accepts (`auth.test`) is that install, and does what `on_installed` does.
    In the background of startup, retried while Kubernetes or Slack fail; a refused token resumes nothing."""
    for attempt in range(attempts):
        try:
            found = await client.auth_test()
            if found.get("team_id") and client.token:
                await restore(deps, str(found["team_id"]), client.token)
            return
        except SlackApiError as exc:
            if exc.response is not None and exc.response.status_code == 200:  # Slack refuses the token
                LOG.warning("the bot token is refused (%s): no doppel resumed", exc.response.get("error"))
                return
            LOG.warning("startup check of the bot token failed (attempt %d): %s", attempt + 1, exc)
        except Exception:
            LOG.exception("resuming the doppels stopped by a revocation failed (attempt %d)", attempt + 1)
        await asyncio.sleep(5.0 * 2**attempt)


async def restore(deps: Deps, team_id: str, token: str) -> None:
    """The workspace `team_id` has the app again, with bot `token`: the doppels a revocation stopped get
    the token's Secret and resume; those a person suspended stay so."""
    namespace = deps.config.namespace_for(team_id)
    stopped = [
        doppel
        for doppel in await deps.kube.list_doppels(namespace, team_id)
        if (doppel["metadata"].get("annotations") or {}).get(ANNOTATION_STOPPED) in REVOCATIONS
    ]
    if not stopped:
        return
    secret = token_secret(deps.config.token_secret, team_id)
    await deps.kube.put_secret(namespace, secret, {"token": token}, team_id)
    for doppel in stopped:
        await deps.kube.resume_doppel(namespace, doppel["metadata"]["name"])
    deps.snapshots.invalidate(namespace, team_id)
    LOG.warning("team %s has the app again: %d doppels resumed", team_id, len(stopped))


def _suspended(doppel: dict[str, Any]) -> bool:
    return bool((doppel.get("spec") or {}).get("suspend"))
