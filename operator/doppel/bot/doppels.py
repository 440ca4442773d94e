"""Creating a person's doppel from Slack: the workspace's limit, its token's Secret, and the DoppelUser
object with only what was set (the CRD and the operator fill in the rest, as for one applied by hand).
`adopt_org` tells doppels made before their workspace's Enterprise Grid org installed the app org-wide
which installation now speaks for them.
"""

from __future__ import annotations

from slack_bolt.context.async_context import AsyncBoltContext

from doppel import api
from doppel.bot import logic
from doppel.bot.deps import Deps
from doppel.bot.kube import (
    ANNOTATION_ENTERPRISE,
    ANNOTATION_ORG_INSTALL,
    ANNOTATION_REQUESTER,
    LABEL_TEAM,
    AlreadyExists,
    token_secret,
)
from doppel.bot.logic import Tenant


async def create_doppel(
    deps: Deps,
    context: AsyncBoltContext,
    tenant: Tenant,
    user_id: str,
    handle: str,
    requester: str,
) -> str:
    config = deps.config
    team_id = tenant.team_id
    namespace = config.namespace_for(team_id)
    name = await _free_name(deps, namespace, team_id, user_id, handle)
    if await at_limit(deps, namespace, team_id):  # checked again: approvals arrive later
        return limit_text(deps)
    # Each workspace's token in a Secret of its own: the scrape Job reads only its own team's.
    secret = token_secret(config.token_secret, team_id)
    if context.bot_token:
        await deps.kube.put_secret(namespace, secret, {"token": context.bot_token}, team_id)
    annotations = {ANNOTATION_REQUESTER: requester}
    if tenant.enterprise_id:  # where the progress notifier finds the installation's token
        annotations[ANNOTATION_ENTERPRISE] = tenant.enterprise_id
    if tenant.org_wide:
        annotations[ANNOTATION_ORG_INSTALL] = "true"
    # Set only when known: an unset field keeps the CRD's default (exclude_unset below).
    profile = config.new_doppel_rate_profile()
    rate_profile = {"rate_profile": profile} if profile else {}
    spec = api.DoppelUserSpec(
        slack=api.Slack(team_id=team_id, token_secret_ref=api.SecretKeyRef(name=secret), **rate_profile),
        target=api.Target(user_id=user_id, handle=handle),
        base_model=api.BaseModelRef(served_name=config.base_model_name, path=config.base_model_path),
    )
    body = {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {LABEL_TEAM: team_id},
            "annotations": annotations,
        },
        # Only what was set: everything else gets the same defaults as an object applied with kubectl
        # (the CRD's, and the operator's --train-defaults for scheduling), never a copy frozen here.
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
    }
    try:
        await deps.kube.create_doppel(namespace, body)
        deps.snapshots.invalidate(namespace, team_id)
    except AlreadyExists:
        return f"{handle} already has a doppel: `/doppel status @{handle}`."
    return (
        f"Training a doppel of {handle}: I will tell you its progress in a direct message "
        f"(`/doppel status @{handle}`)."
    )


async def _free_name(deps: Deps, namespace: str, team_id: str, user_id: str, handle: str) -> str:
    """The DoppelUser name of person `user_id`: `logic.object_name`, or, where an object made before names
    carried a hash holds it for someone else (`alice.b`'s `alice-b-…` when `alice-b` trains), the same
    name with the hash of the person."""
    name = logic.object_name(handle, team_id, user_id)
    holder = await deps.kube.get_doppel(namespace, team_id, name)
    if holder is None or logic.target_of(holder) == user_id:
        return name
    return logic.object_name(handle, team_id, user_id, hashed=True)


async def adopt_org(deps: Deps, tenant: Tenant) -> None:
    """Annotate the tenant's doppels with its Grid org (and org-wide install) when they lack it: made before
    the org installed the app org-wide, their progress messages would look for a workspace installation
    that is gone. Once per workspace and process: a request from the workspace is what tells."""
    if not tenant.enterprise_id or (tenant.team_id, tenant.enterprise_id) in deps.orgs_adopted:
        return
    wanted = {ANNOTATION_ENTERPRISE: tenant.enterprise_id}
    if tenant.org_wide:
        wanted[ANNOTATION_ORG_INSTALL] = "true"
    namespace = deps.config.namespace_for(tenant.team_id)
    for doppel in await deps.kube.list_doppels(namespace, tenant.team_id):
        annotations = doppel["metadata"].get("annotations") or {}
        if any(annotations.get(key) != value for key, value in wanted.items()):
            await deps.kube.annotate_doppel(namespace, doppel["metadata"]["name"], wanted)
    deps.orgs_adopted.add((tenant.team_id, tenant.enterprise_id))


async def at_limit(deps: Deps, namespace: str, team_id: str) -> bool:
    return len(await deps.kube.list_doppels(namespace, team_id)) >= deps.config.max_doppels_per_workspace


def limit_text(deps: Deps) -> str:
    limit = deps.config.max_doppels_per_workspace
    return f"This workspace has reached its limit of {limit} doppels: `/doppel forget` one first."
