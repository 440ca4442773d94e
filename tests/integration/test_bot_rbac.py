"""RBAC: the bot, configured as the chart configures it, makes only the API calls the chart's bot Role
grants: in its own namespace (no cluster-wide list or watch of DoppelUsers), and on Secrets only those the
Role names. kmock records every request of a run through /doppel train, list, the progress notifier
(list and watch) and forget; each is checked against the rendered rules, resourceNames included."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.bot_fixtures import TEAM_ID, bot_config, command_form
from tests.support.helm import find_manifest, find_manifests, render_chart, rendered_env

from doppel.bot.background import notify_once
from doppel.bot.config import BotConfig

VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}


def _requests(kmock: Any) -> list[tuple[str, str, str, str | None, str | None]]:
    """(apiGroup, resource, verb, namespace, name) of every request the bot made."""
    seen = []
    for request in kmock:
        if request.resource is None or not request.resource.plural:
            continue  # API discovery
        action = request.action.name if request.action is not None else ""
        verb = VERBS.get(action) or {"PATCH": "patch", "PUT": "update"}.get(str(request.method.value).upper())
        if verb is not None:
            group = request.resource.group or ""
            seen.append((group, request.resource.plural, verb, request.namespace, request.name))
    return seen


def _allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str, name: str | None) -> bool:
    return any(
        group in rule["apiGroups"]
        and resource in rule["resources"]
        and verb in rule["verbs"]
        and ("resourceNames" not in rule or (name is not None and name in rule["resourceNames"]))
        for rule in rules
    )


async def test_bot_uses_only_its_namespace_and_its_own_secrets(bot_harness, bot_kube, slack_emulator):
    manifests = render_chart(set_values={"workspaces": [TEAM_ID]})
    assert not [m for m in find_manifests(manifests, "ClusterRole") if m["metadata"]["name"].endswith("-bot")]
    rules = find_manifest(manifests, "Role", "bot")["rules"]
    chart = BotConfig.from_env(rendered_env(manifests, "bot"))
    (namespace,) = chart.watch_namespaces
    config = bot_config(
        team_namespaces=chart.team_namespaces,
        bot_namespace=chart.bot_namespace,
        watch_namespaces=chart.watch_namespaces,
        token_secret=chart.token_secret,
        poll_interval_s=0.2,
    )
    bot = await bot_harness(config)
    assert "Training a doppel of bob" in (await bot.form(command_form("train @bob", user="U02BOB"))).text
    assert "*bob*" in (await bot.form(command_form("list", user="U03CAROL"))).text
    await notify_once(bot.bot)
    await asyncio.sleep(1.0)  # the watch and a few polls
    assert "Forgot" in (await bot.form(command_form("forget @bob", user="U02BOB"))).text

    made = _requests(bot_kube[0])
    kinds = {(group, resource, verb) for group, resource, verb, _, _ in made}
    # The run covered the bot's whole surface (a recording regression would make the test vacuous).
    assert {("doppel.dev", "doppelusers", "create"), ("doppel.dev", "doppelusers", "list")} <= kinds
    assert {("doppel.dev", "doppelusers", "watch"), ("", "secrets", "patch")} & kinds
    outside = sorted({r for r in made if r[3] != namespace})
    assert outside == [], f"requests outside the release namespace: {outside}"
    denied = sorted({r for r in made if not _allowed(rules, r[0], r[1], r[2], r[4])})
    assert denied == [], f"the chart's bot Role does not grant: {denied}"
