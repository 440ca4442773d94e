"""The `/doppel` command: acknowledged within Slack's 3 seconds (its answer itself when ready that fast,
else through the command's response_url), then help, list, status, switch, forget and train, each scoped
to the tenant's workspace and answered only to whoever ran it. Switch and forget of someone else's doppel
follow `logic.PERMISSIONS` (the person, whoever asked for it, workspace admins); a deactivated person can
still be forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot import logic
from doppel.bot.access import admitted, tenant_of
from doppel.bot.consent import ask_consent
from doppel.bot.deps import Deps
from doppel.bot.doppels import adopt_org, at_limit, create_doppel, limit_text
from doppel.bot.feedback import status_line
from doppel.bot.kube import ANNOTATION_REQUESTER
from doppel.bot.logic import Tenant

LOG = logging.getLogger(__name__)
# A command's answer is the acknowledgement itself when it is ready this fast; Slack allows 3 s.
COMMAND_ACK_S = 1.5
SORRY_COMMAND = (
    "Sorry, I couldn't do that (Slack or the cluster had a problem). Please try again in a minute."
)


async def on_command(
    deps: Deps, ack: Any, respond: Any, command: dict[str, Any], context: AsyncBoltContext
) -> None:
    tenant = tenant_of(context, command)
    deps.metrics.event_received("command", tenant.team_id)

    async def answer() -> str:
        # A command's answer is only ever seen by whoever ran it (ephemeral): refusals too.
        if not await admitted(deps, context.client, tenant, command, command.get("user_id") or ""):
            return logic.REFUSAL
        await adopt_org(deps, tenant)
        return await run_command(deps, context, tenant, command)

    async def result() -> str:
        try:
            return await answer()
        except logic.CommandError as exc:
            return str(exc)
        except Exception:
            # Kubernetes or Slack failed: the person still gets an answer, the operator the traceback.
            LOG.exception("/doppel %s of team %s failed", _verb(command), tenant.team_id)
            deps.metrics.error("command_failed")
            return SORRY_COMMAND

    task = asyncio.ensure_future(result())
    done, _ = await asyncio.wait({task}, timeout=COMMAND_ACK_S)
    if task in done:
        await ack(text=task.result())
        return
    # Kubernetes or Slack is slow today: acknowledge now, answer through the command's response_url.
    await ack(text="Working on it…")
    await respond(text=await task, response_type="ephemeral")


def _verb(command: dict[str, Any]) -> str:
    """The command's first word, for the log (never its argument: a person's name)."""
    words = str(command.get("text") or "").split()
    return words[0].lower()[:20] if words else "help"


async def run_command(deps: Deps, context: AsyncBoltContext, tenant: Tenant, command: dict[str, Any]) -> str:
    parsed = logic.parse_command(command.get("text", ""))
    team_id = tenant.team_id
    namespace = deps.config.namespace_for(team_id)
    kube = deps.kube
    if parsed.verb == "help":
        return logic.HELP
    if parsed.verb == "list":
        doppels = await kube.list_doppels(namespace, team_id)
        if not doppels:
            return "No doppels in this workspace yet: `/doppel train @someone`."
        active = (await kube.get_state(namespace, team_id)).get("active")
        lines = [
            logic.describe(d) + (" (active)" if d["metadata"]["name"] == active else "") for d in doppels
        ]
        return "\n".join(lines)
    client = context.client
    if parsed.verb == "status" and parsed.user is None:
        active = (await kube.get_state(namespace, team_id)).get("active")
        doppel = await kube.get_doppel(namespace, team_id, active) if active else None
        if doppel is None:
            return "No active doppel: `/doppel switch @someone`."
        return logic.describe(doppel) + await status_line(deps, namespace, doppel)
    assert parsed.user is not None
    # A deactivated person has no doppel to train, but one to look at and to forget.
    user_id, handle = await _resolve(deps, client, tenant, parsed.user, deactivated=parsed.verb != "train")
    if parsed.verb == "train":
        return await _train(deps, context, tenant, user_id, handle, command)
    doppel = await doppel_of(deps, namespace, team_id, user_id, handle)
    if doppel is None:
        return f"There is no doppel of {handle}: `/doppel train @{handle}`."
    name = doppel["metadata"]["name"]
    if parsed.verb == "status":
        return logic.describe(doppel) + await status_line(deps, namespace, doppel)
    actor = await deps.lookups.user(client, team_id, command["user_id"])
    requester = (doppel["metadata"].get("annotations") or {}).get(ANNOTATION_REQUESTER)
    if not logic.may_manage(actor, logic.target_of(doppel) or "", requester):
        what = "switch to" if parsed.verb == "switch" else "make me forget"
        return f"Only {handle}, whoever asked for this doppel, or a workspace admin can {what} it."
    if parsed.verb == "switch":
        await kube.set_state(namespace, team_id, {"active": name})
        deps.snapshots.invalidate(namespace, team_id)
        return f"{handle}'s doppel now answers mentions in this workspace."
    await kube.delete_doppel(namespace, name)
    deps.snapshots.invalidate(namespace, team_id)
    if (await kube.get_state(namespace, team_id)).get("active") == name:
        await kube.set_state(namespace, team_id, {"active": ""})
    return f"Forgot {handle}'s doppel: its adapter and data are being deleted."


async def doppel_of(
    deps: Deps, namespace: str, team_id: str, user_id: str, handle: str
) -> dict[str, Any] | None:
    """The doppel of person `user_id`, or None: the object of its name if it is theirs, else whichever
    is theirs (one applied by hand, or named before names carried a hash). Never one that merely has the
    name: `alice.b` and `alice-b` are two people."""
    found = await deps.kube.get_doppel(namespace, team_id, logic.object_name(handle, team_id, user_id))
    if found is not None and logic.target_of(found) == user_id:
        return found
    listed = await deps.kube.list_doppels(namespace, team_id)
    return next((d for d in listed if logic.target_of(d) == user_id), None)


async def _resolve(
    deps: Deps, client: AsyncWebClient, tenant: Tenant, ref: logic.UserRef, *, deactivated: bool = False
) -> tuple[str, str]:
    """(user id, handle) of a named member of the tenant's workspace; CommandError when there is none
    (a doppel is only ever of a member: never of a Slack Connect user of another organisation, nor of a
    guest unless the chart allows guests; a deactivated member only when `deactivated`)."""
    policy = {"guests": deps.config.allow_guests, "deactivated": deactivated}
    if ref.user_id:
        user = await deps.lookups.user(client, tenant.team_id, ref.user_id)
        if not user:
            raise logic.CommandError(f"no Slack user <@{ref.user_id}> in this workspace")
        if logic.is_guest(user) and not deps.config.allow_guests:
            raise logic.CommandError(f"<@{ref.user_id}> is a guest of this workspace: doppels are of members")
        if user.get("deleted") and not deactivated:
            raise logic.CommandError(f"<@{ref.user_id}> has been deactivated in this workspace")
        if not logic.is_member(user, tenant, **policy):
            raise logic.CommandError(
                f"<@{ref.user_id}> is not a member of this workspace: doppels are only of its own members"
            )
        return str(user["id"]), str(user.get("name") or ref.handle or user["id"])
    wanted = (ref.handle or "").lower()
    cursor = None
    while True:
        page = await client.users_list(limit=200, cursor=cursor)
        for user in page.get("members", []):
            names = {user.get("name"), (user.get("profile") or {}).get("display_name")}
            if wanted in {n.lower() for n in names if n} and logic.is_member(user, tenant, **policy):
                return str(user["id"]), str(user.get("name") or wanted)
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            raise logic.CommandError(f"no Slack user @{ref.handle} in this workspace")


async def _train(
    deps: Deps,
    context: AsyncBoltContext,
    tenant: Tenant,
    user_id: str,
    handle: str,
    command: dict[str, Any],
) -> str:
    team_id = tenant.team_id
    namespace = deps.config.namespace_for(team_id)
    existing = await doppel_of(deps, namespace, team_id, user_id, handle)
    if existing is not None:
        return f"{handle} already has a doppel: {logic.describe(existing)}"
    if await at_limit(deps, namespace, team_id):
        return limit_text(deps)
    requester = command["user_id"]
    if requester == user_id or not deps.config.require_consent:
        return await create_doppel(deps, context, tenant, user_id, handle, requester)
    return await ask_consent(deps, context.client, tenant, user_id, handle, requester)
