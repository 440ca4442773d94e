"""Consent: a doppel of someone else is trained only once they agree. The request is a direct message
with Approve/Decline buttons (`ask_consent`), sent at most once an hour per requester and person and five
times an hour per requester (nobody spams a colleague through the bot), both counted in the shared event
ledger, so across every replica of the bot; an answer (`answer_consent`) counts
only from the named person, a member of the same workspace, and whoever asked is told the outcome in a
direct message (`tell`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot import logic
from doppel.bot.access import admitted, tenant_of
from doppel.bot.deps import Deps
from doppel.bot.doppels import create_doppel
from doppel.bot.logic import Tenant

LOG = logging.getLogger(__name__)
CONSENT_ACTION = re.compile(r"^doppel_consent_(approve|decline)$")
# Consent requests one person may send in the ledger's claim lifetime (`event_ttl_s`, an hour by default).
REQUESTS_PER_HOUR = 5
SORRY_CLICK = "Sorry, I couldn't take your answer (Slack had a problem). Please click again in a minute."


async def tell(client: AsyncWebClient, user_id: str, text: str, **extra: Any) -> None:
    """A direct message from the bot to `user_id` (conversations.open, then chat.postMessage)."""
    opened = await client.conversations_open(users=user_id)
    await client.chat_postMessage(channel=opened["channel"]["id"], text=text, **extra)


async def ask_consent(
    deps: Deps, client: AsyncWebClient, tenant: Tenant, user_id: str, handle: str, requester: str
) -> str:
    """Ask `user_id` whether `requester` may train a doppel of them; the requester's answer for now."""
    # Claimed in the shared ledger (its claims last `event_ttl_s`, an hour by default): any replica. The
    # person first: asking again for the same person takes none of the hour's slots.
    asked = f"consent/{requester}/{user_id}"
    if not await deps.ledger.claim(tenant.team_id, asked):
        raise logic.CommandError(
            f"I already asked <@{user_id}> for you within the hour: wait for their answer."
        )
    slot = await _request_slot(deps, tenant.team_id, requester)
    if slot is None:
        await deps.ledger.release(tenant.team_id, asked)
        raise logic.CommandError("You have sent enough consent requests for this hour: try again later.")
    request = {"team": tenant.team_id, "target": user_id, "handle": handle, "requester": requester}
    value = json.dumps(request, separators=(",", ":"))
    # Asked privately, in a direct message: the command may come from a DM (no channel the bot can post
    # in) or a channel the bot is not in, and whether someone agrees is nobody else's business.
    try:
        await _tell_or_release(
            deps,
            tenant.team_id,
            (asked, slot),
            client,
            user_id,
            text=f"<@{user_id}>, <@{requester}> would like to train a doppel of you. Do you agree?",
            blocks=[
                {
                    "type": "section",
                    "text": {
                        "type": "mrkdwn",
                        "text": f"<@{user_id}>, <@{requester}> would like to train a doppel of you on your "
                        "Slack messages. It will answer mentions in your voice. Do you agree?",
                    },
                },
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "style": "primary",
                            "text": {"type": "plain_text", "text": "Approve"},
                            "action_id": "doppel_consent_approve",
                            "value": value,
                        },
                        {
                            "type": "button",
                            "style": "danger",
                            "text": {"type": "plain_text", "text": "Decline"},
                            "action_id": "doppel_consent_decline",
                            "value": value,
                        },
                    ],
                },
            ],
        )
    except SlackApiError as exc:
        error = exc.response.get("error") if exc.response is not None else None
        raise logic.CommandError(f"I could not ask <@{user_id}> in a direct message ({error}).") from None
    return f"Asked <@{user_id}> for their approval; I will tell you in a direct message when they answer."


async def _request_slot(deps: Deps, team_id: str, requester: str) -> str | None:
    """Take one of the requester's `REQUESTS_PER_HOUR` slots in the shared ledger (a slot frees itself when
    its claim expires, an hour after it was taken): its key, or None when every one is taken."""
    for slot in range(REQUESTS_PER_HOUR):
        key = f"consent-slot/{requester}/{slot}"
        if await deps.ledger.claim(team_id, key):
            return key
    return None


async def _tell_or_release(
    deps: Deps, team_id: str, claims: tuple[str, ...], client: AsyncWebClient, user_id: str, **message: Any
) -> None:
    """`tell`, giving the consent request's `claims` back when it fails: nobody was asked, so neither a
    retry nor the hour's count may act as if someone had been."""
    try:
        await tell(client, user_id, **message)
    except Exception:
        for key in claims:
            try:
                await deps.ledger.release(team_id, key)
            except Exception:
                LOG.exception("consent claim %s of team %s not released", key, team_id)
        raise


async def answer_consent(
    deps: Deps, context: AsyncBoltContext, body: dict[str, Any], action: dict[str, Any]
) -> None:
    request = json.loads(action["value"])
    tenant, clicker = tenant_of(context, body), body["user"]["id"]
    client = context.client
    # The button travels through Slack: only the named person, a member of the same workspace, can answer
    # it. Refusals go to the clicker alone (ephemeral, where they clicked): a shared channel's other
    # company sees nothing.
    clicked_in = (body.get("channel") or {}).get("id") or ""
    try:
        allowed = await admitted(deps, client, tenant, body, clicker)
    except Exception:
        # Slack could not say who clicked: no refusal, and the buttons are still there to click again.
        LOG.exception("consent answer by %s of team %s: not admitted yet", clicker, tenant.team_id)
        await client.chat_postEphemeral(channel=clicked_in, user=clicker, text=SORRY_CLICK)
        return
    if not allowed:
        await client.chat_postEphemeral(channel=clicked_in, user=clicker, text=logic.REFUSAL)
        return
    if request["team"] != tenant.team_id or clicker != request["target"]:
        LOG.warning("consent answer by %s of team %s refused", clicker, tenant.team_id)
        await client.chat_postEphemeral(
            channel=clicked_in, user=clicker, text=f"Only <@{request['target']}> can answer this."
        )
        return
    if CONSENT_ACTION.match(action["action_id"]).group(1) == "decline":  # type: ignore[union-attr]
        text = f"<@{clicker}> declined; no doppel of them will be trained."
    else:
        result = await create_doppel(deps, context, tenant, clicker, request["handle"], request["requester"])
        text = f"<@{clicker}> approved. {result}"
    await tell(client, request["requester"], text)
