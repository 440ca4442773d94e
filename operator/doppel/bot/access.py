"""Who a verified Slack request is from and whether they may use the doppels: its tenant (the workspace
every object it touches is scoped to), every workspace it claims to be of, and membership (`admitted`).
"""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot import logic
from doppel.bot.deps import Deps
from doppel.bot.logic import Tenant

LOG = logging.getLogger(__name__)


def claimed_teams(context: AsyncBoltContext, body: dict[str, Any]) -> set[str]:
    """Every workspace a request says it is of."""
    team = body.get("team")
    authorizations = body.get("authorizations") or [{}]
    named = {
        context.team_id,
        body.get("team_id"),
        team.get("id") if isinstance(team, dict) else team,
        authorizations[0].get("team_id"),
    }
    return {str(t) for t in named if t}


def tenant_of(context: AsyncBoltContext, body: dict[str, Any]) -> Tenant:
    """The workspace of a verified request, which every object it touches is scoped to: the installation's
    own workspace, or, for an org-wide (Enterprise Grid) installation, the workspace the request comes
    from. Never the acting user's team: in a Slack Connect channel that is another organisation."""
    auth = context.authorize_result
    org_wide = bool(context.is_enterprise_install)
    team = auth.team_id if auth is not None and not org_wide else None
    if not team:
        authorizations = body.get("authorizations") or [{}]
        payload_team = body.get("team")
        team = (
            context.team_id
            or body.get("team_id")
            or (payload_team.get("id") if isinstance(payload_team, dict) else payload_team)
            or authorizations[0].get("team_id")
        )
    if not team:
        raise ValueError("request carries no team id")
    enterprise = (auth.enterprise_id if auth is not None else None) or context.enterprise_id
    return Tenant(str(team), enterprise, org_wide)


async def admitted(
    deps: Deps, client: AsyncWebClient, tenant: Tenant, body: dict[str, Any], user_id: str
) -> bool:
    """Whether `user_id` may use the tenant's doppels: a member of its workspace (or, for an org-wide
    install, of its org), by the payload's own team fields and by `users.info`; a guest only when the
    chart allows guests. Raises when Slack fails to say who the user is: that is no refusal."""
    foreign = logic.foreign_teams(body, tenant)
    user = await deps.lookups.user(client, tenant.team_id, user_id) if user_id and not foreign else {}
    if foreign or not logic.is_member(user, tenant, guests=deps.config.allow_guests):
        LOG.warning("user %s (teams %s) refused by team %s", user_id, foreign or user.get("team_id"), tenant)
        return False
    return True
