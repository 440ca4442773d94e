"""Tenants kept apart: workspaces of one install, Slack Connect, Enterprise Grid.

The real bot (Bolt under uvicorn) configured from the environment the chart renders (default values, and
examples/values-scaled.yaml with its database in a real PostgreSQL server on loopback), two workspaces in
the Slack emulator that each have an `alice`, DoppelUsers in kmock. Payloads are shaped as Slack sends them:
Slack Connect envelopes (`is_ext_shared_channel`, `user_team`, `source_team`), Grid `enterprise_id`,
org-wide envelopes whose `authorizations[0].team_id` is null.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import urllib.parse
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore
from tests.support.bot_fixtures import (
    CLIENT_ID,
    CLIENT_SECRET,
    SIGNING_SECRET,
    OAuthSlackEmulator,
    as_team,
    command_form,
    doppel_body,
    kube_for,
    mention_payload,
    name_of,
    say,
)
from tests.support.bot_steps import install, secret_token, until
from tests.support.helm import CHART_DIR, NAMESPACE, HelmError, render_chart, rendered_env
from tests.support.slack_emulator import SlackEmulator, Team
from tests.support.slack_fixtures import ACME_TOKEN

from doppel.bot.background import notify_once
from doppel.bot.config import BotConfig
from doppel.bot.installation_store import KubernetesSecretInstallationStore
from doppel.bot.kube import api_client
from doppel.bot.logic import REFUSAL, SHARED_CHANNEL

# Two of the workspaces examples/values-scaled.yaml lists.
TEAM_A, TEAM_B = "T0123ABCD", "T0456EFGH"
GENERAL_A, PARTNERS_A, GENERAL_B = "C01GENERAL", "C05PARTNER", "C0BGENERAL"
ALICE_A, BOB_A, CAROL_A = "U01ALICE", "U02BOB", "U03CAROL"
ALICE_B, BOB_B = "U0B1ALICE", "U0B2BOB"
BOT_A, BOT_B = "U0DOPPEL", "U0BDOPPEL"
TOKEN_B = "xoxb-globex-0002-test"
DATABASE_REF = "doppel-database/DATABASE_URL"  # the Secret values-scaled.yaml names, and its key


def globex(enterprise: str | None = None) -> dict[str, Any]:
    """Workspace B: its own alice and bob (other people than A's, with A's handles)."""

    def person(user_id: str, handle: str, real_name: str) -> dict[str, Any]:
        user = {
            "id": user_id,
            "team_id": TEAM_B,
            "name": handle,
            "real_name": real_name,
            "deleted": False,
            "is_bot": False,
            "profile": {"display_name": handle, "real_name": real_name},
        }
        if enterprise:
            user["enterprise_user"] = {"id": user_id, "enterprise_id": enterprise, "teams": [TEAM_B]}
        return user

    return {
        "team": {"id": TEAM_B, "name": "Globex", "domain": "globex"},
        "users": [person(ALICE_B, "alice", "Alice Berg"), person(BOB_B, "bob", "Bob Brandt")],
        "channels": [{"id": GENERAL_B, "name": "general", "members": [ALICE_B, BOB_B, BOT_B]}],
        "messages": {},
    }


def acme(slack_workspace: dict[str, Any], enterprise: str | None = None) -> dict[str, Any]:
    workspace = as_team(slack_workspace, TEAM_A, "Acme")
    if enterprise:
        for user in workspace["users"]:
            user["enterprise_user"] = {"id": user["id"], "enterprise_id": enterprise, "teams": [TEAM_A]}
    return workspace


def chart_config(values: list[Any], set_values: dict[str, Any], secrets: dict[str, str]) -> BotConfig:
    """The bot's configuration exactly as `doppel bot` reads it from the environment the chart renders."""
    env = rendered_env(render_chart(values, set_values), "bot", secrets)
    # The chart mounts the shared volume at DOPPEL_DATA_ROOT (/data): here a fresh directory stands in for it.
    data_root = tempfile.mkdtemp(prefix="doppel-bot-data-")
    return replace(BotConfig.from_env(env), poll_interval_s=3600, data_root=data_root)


def command(text: str, *, user: str, team: str, channel: str, **extra: str) -> str:
    form = dict(urllib.parse.parse_qsl(command_form(text, user=user, team=team, channel=channel)))
    return urllib.parse.urlencode({**form, **extra})


def click(value: str, *, user: str, user_team: str, team: str, channel: str, approve: bool = True) -> str:
    """A block_actions payload as Slack sends it for a button of a bot message."""
    payload = {
        "type": "block_actions",
        "team": {"id": team, "domain": team.lower()},
        "user": {"id": user, "username": user.lower(), "team_id": user_team},
        "api_app_id": "A0DOPPEL",
        "channel": {"id": channel, "name": "general"},
        "container": {"type": "message", "channel_id": channel, "is_ephemeral": False},
        "trigger_id": "1.2.3",
        "response_url": "http://127.0.0.1:9/unused",
        "actions": [
            {
                "action_id": f"doppel_consent_{'approve' if approve else 'decline'}",
                "block_id": "b1",
                "type": "button",
                "value": value,
                "action_ts": str(time.time()),
            }
        ],
    }
    return urllib.parse.urlencode({"payload": json.dumps(payload)})


def mention(
    emulator: SlackEmulator, team: Team, user: str, text: str, channel: str, event_id: str, **envelope: Any
) -> dict[str, Any]:
    ts = say(emulator, user, text, channel=channel, team=team)
    payload = mention_payload(text, ts, event_id=event_id, user=user, team=team.id, channel=channel)
    payload["authorizations"][0]["user_id"] = team.bot_user_id
    for key, value in envelope.items():
        if key in ("user_team", "source_team"):
            payload["event"][key] = value
        else:
            payload[key] = value
    return payload


def consent_values(emulator: SlackEmulator, team: Team) -> list[str]:
    """The Approve buttons' values of every consent request the bot posted in `team`, wherever it did."""
    with emulator._lock:
        messages = [m for msgs in team.messages.values() for m in msgs if m.get("bot_id") == team.bot_id]
    return [
        element["value"]
        for message in messages
        for block in message.get("blocks") or []
        for element in block.get("elements") or []
        if element.get("action_id") == "doppel_consent_approve"
    ]


def patch_status(kmock: Any, name: str, status: dict[str, Any]) -> None:
    key = next(k for k in kmock.objects if k[2] == name and "doppelusers" in str(k[0]))
    kmock.objects[key].patch({"status": status})


async def test_two_workspaces_of_the_scaled_install_never_see_each_other(
    bot_harness, bot_kube, slack_workspace, postgres_url
):
    """examples/values-scaled.yaml: one OAuth app, three workspaces in the release namespace, installations
    in PostgreSQL. Everything team B does (install, mention, every /doppel command, a consent click) stays
    in B, and the other way round."""
    emulator = OAuthSlackEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rate_scale=1000.0)
    team_a = emulator.add_team(acme(slack_workspace), token="xoxb-never-given-a", bot_user_id=BOT_A)
    team_b = emulator.add_team(globex(), token="xoxb-never-given-b", bot_user_id=BOT_B)
    asked: list[str] = []

    async def chat(model: str, messages: Any) -> str:
        asked.append(model)
        return f"answer of {model}"

    slack = {
        "signingSecret": SIGNING_SECRET,
        "botToken": "",
        "clientId": CLIENT_ID,
        "clientSecret": CLIENT_SECRET,
    }
    config = chart_config(
        [CHART_DIR / "examples" / "values-scaled.yaml"], {"slack": slack}, {DATABASE_REF: postgres_url}
    )
    assert config.namespace_for(TEAM_A) == config.namespace_for(TEAM_B) == NAMESPACE  # one shared namespace
    kmock, url = bot_kube
    kube = kube_for(url)
    with emulator:
        bot = await bot_harness(config, emulator=emulator, chat=chat)
        token_a = await install(bot, emulator, TEAM_A)
        token_b = await install(bot, emulator, TEAM_B)
        store = SQLAlchemyInstallationStore(CLIENT_ID, sa.create_engine(postgres_url))

        def find(team_id: str) -> Any:
            return store.find_installation(enterprise_id=None, team_id=team_id)

        assert (await asyncio.to_thread(find, TEAM_A)).bot_token == token_a  # B's install changed nothing
        assert (await asyncio.to_thread(find, TEAM_B)).bot_token == token_b

        async def run(text: str, user: str, team: Team, channel: str) -> str:
            response = await bot.form(command(text, user=user, team=team.id, channel=channel))
            assert response.status_code == 200
            return response.text

        # Each alice trains herself: two doppels of two different people, both handled `alice`.
        assert "Training a doppel of alice" in await run("train @alice", ALICE_A, team_a, GENERAL_A)
        assert "Training a doppel of alice" in await run("train @alice", ALICE_B, team_b, GENERAL_B)
        a, b = [await kube.get_doppel(NAMESPACE, t, name_of("alice", t)) for t in (TEAM_A, TEAM_B)]
        assert (a["spec"]["target"]["userId"], b["spec"]["target"]["userId"]) == (ALICE_A, ALICE_B)
        assert (a["spec"]["slack"]["teamId"], b["spec"]["slack"]["teamId"]) == (TEAM_A, TEAM_B)
        # Installed through OAuth in other workspaces: a non-Marketplace app, as Slack limits it.
        assert {d["spec"]["slack"]["rateProfile"] for d in (a, b)} == {"non-marketplace"}
        # Each scrape reads its own workspace's token; B's train did not overwrite A's.
        secrets = [d["spec"]["slack"]["tokenSecretRef"]["name"] for d in (a, b)]
        tokens = [await asyncio.to_thread(secret_token, url, NAMESPACE, s) for s in secrets]
        assert tokens == [token_a, token_b]

        # A's alice is Ready, B's still Pending: a mention in B never reaches A's adapter.
        patch_status(
            kmock, a["metadata"]["name"], {"phase": "Ready", "adapter": {"servedName": "alice-acme"}}
        )
        await bot.event(mention(emulator, team_b, BOB_B, f"<@{BOT_B}> as alice hi", GENERAL_B, "EvB1"))
        [reply_b] = await bot.wait_posts(GENERAL_B, 1, team=team_b)
        assert "alice's doppel is still training" in reply_b["text"] and asked == []
        await bot.event(mention(emulator, team_a, BOB_A, f"<@{BOT_A}> as alice hi", GENERAL_A, "EvA1"))
        [reply_a] = await bot.wait_posts(GENERAL_A, 1, team=team_a)
        assert reply_a["text"] == "answer of alice-acme" and asked == ["alice-acme"]

        # list, switch, status: each workspace sees and changes only its own.
        assert await run("list", BOB_B, team_b, GENERAL_B) == "*alice*: Pending"
        assert await run("list", BOB_A, team_a, GENERAL_A) == "*alice*: Ready"
        assert "now answers" in await run("switch @alice", ALICE_B, team_b, GENERAL_B)
        assert await run("status", BOB_B, team_b, GENERAL_B) == "*alice*: Pending"
        assert "No active doppel" in await run("status", BOB_A, team_a, GENERAL_A)
        # A's alice answered once: its feedback line counts that reply alone (B's alice keeps its own).
        assert await run("status @alice", BOB_A, team_a, GENERAL_A) == (
            "*alice*: Ready\nFeedback: 0 👍, 0 👎, 0 corrections on 1 replies (the next training uses them)."
        )

        # A consent request of B: A's alice cannot answer it (privately told), B's bob can.
        assert "Asked <@U0B2BOB>" in await run("train @bob", ALICE_B, team_b, GENERAL_B)
        [value] = await until(lambda: consent_values(emulator, team_b))
        await bot.form(click(value, user=ALICE_A, user_team=TEAM_A, team=TEAM_A, channel=GENERAL_A))
        refusal = await until(lambda: emulator.ephemeral_posts(GENERAL_A, team_a))
        assert refusal[0]["user"] == ALICE_A and "Only <@U0B2BOB>" in refusal[0]["text"]
        assert await kube.get_doppel(NAMESPACE, TEAM_B, name_of("bob", TEAM_B)) is None
        await bot.form(click(value, user=BOB_B, user_team=TEAM_B, team=TEAM_B, channel=GENERAL_B))
        bob_b = await until_doppel(kube, TEAM_B, "bob")
        assert bob_b["spec"]["target"]["userId"] == BOB_B
        assert await kube.get_doppel(NAMESPACE, TEAM_A, name_of("bob", TEAM_A)) is None

        # forget in B leaves A's alice as she was.
        assert "Forgot alice's doppel" in await run("forget @alice", ALICE_B, team_b, GENERAL_B)
        assert await kube.get_doppel(NAMESPACE, TEAM_B, name_of("alice", TEAM_B)) is None
        assert await run("list", BOB_A, team_a, GENERAL_A) == "*alice*: Ready"
        assert sorted(d["metadata"]["name"] for d in await kube.list_doppels(NAMESPACE, TEAM_A)) == [
            name_of("alice", TEAM_A)
        ]

        # Progress: each workspace is told about its own doppels only, with its own token.
        patch_status(kmock, name_of("bob", TEAM_B), {"phase": "Training", "samples": 12})
        await notify_once(bot.bot)  # besides the pass the watch starts
        # Progress goes by direct message to whoever asked: every message of each team's bot, anywhere.
        texts = lambda team: [p["text"] for c in list(team.messages) for p in emulator.posted(c, team)]  # noqa: E731
        await until(lambda: any("alice's doppel is ready" in t for t in texts(team_a)))
        await until(lambda: any("bob's doppel: scraped 12 samples" in t for t in texts(team_b)))
        told_a, told_b = texts(team_a), texts(team_b)
        assert not any("bob" in t for t in told_a) and not any("is ready" in t for t in told_b)


async def until_doppel(kube: Any, team: str, handle: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while (found := await kube.get_doppel(NAMESPACE, team, name_of(handle, team))) is None:
        assert time.monotonic() < deadline, f"no doppel of {handle} in {team}"
        await asyncio.sleep(0.05)
    return found


async def test_slack_connect_users_and_other_workspaces_are_refused_privately(
    bot_harness, bot_kube, slack_workspace, caplog
):
    """The default chart install (one workspace, a bot token). B's alice is in A's channel shared with her
    company (Slack Connect): she cannot talk to A's doppels, train one, be trained or answer a consent
    request, and each refusal is hers alone. Requests of another workspace, or an org-wide envelope, are
    refused outright."""
    emulator = SlackEmulator(rate_scale=1000.0)
    team_a = emulator.add_team(acme(slack_workspace), token=ACME_TOKEN, bot_user_id=BOT_A)
    team_b = emulator.add_team(globex(), token=TOKEN_B, bot_user_id=BOT_B)
    external = next(u for u in globex()["users"] if u["id"] == ALICE_B)
    emulator.add_external_user(external, PARTNERS_A, team_a)
    asked: list[str] = []

    async def chat(model: str, messages: Any) -> str:
        asked.append(model)
        return "hello"

    slack = {"signingSecret": SIGNING_SECRET, "botToken": ACME_TOKEN}
    config = chart_config([], {"slack": slack, "workspaces": [TEAM_A]}, {})
    kube = kube_for(bot_kube[1])
    ready = doppel_body("alice", ALICE_A, served_name="alice-acme", team=TEAM_A, namespace=NAMESPACE)
    await kube.create_doppel(NAMESPACE, ready)
    with emulator:
        bot = await bot_harness(config, emulator=emulator, chat=chat)
        connect = {"is_ext_shared_channel": True, "user_team": TEAM_B, "source_team": TEAM_B}
        # Slack Connect envelopes name her company; one without those fields is caught by users.info.
        for event_id, envelope in (("EvExt1", connect), ("EvExt2", {})):
            text = f"<@{BOT_A}> as alice what's the roadmap?"
            await bot.event(mention(emulator, team_a, ALICE_B, text, PARTNERS_A, event_id, **envelope))
        refusals = await until(lambda: [p for p in emulator.ephemeral_posts(PARTNERS_A, team_a)][1:])
        assert all(
            p["user"] == ALICE_B and p["text"] == REFUSAL for p in emulator.ephemeral_posts(PARTNERS_A)
        )
        assert len(refusals) == 1 and emulator.posted(PARTNERS_A, team_a) == [] and asked == []

        def run(text: str, user: str, team: str = TEAM_A, channel: str = PARTNERS_A, **extra: str) -> Any:
            return bot.form(command(text, user=user, team=team, channel=channel, **extra))

        for text in (
            "list",
            "status",
            "status @alice",
            "switch @alice",
            "train @alice",
            "forget @alice",
            "help",
        ):
            assert (await run(text, ALICE_B)).text == REFUSAL, text
        # A member cannot train the external alice either (neither by mention nor by handle: `@alice`
        # is A's own alice), and nobody is asked for consent.
        refused = await run(f"train <@{ALICE_B}|alice>", BOB_A)
        assert "not a member of this workspace" in refused.text
        assert "already has a doppel" in (await run("train @alice", BOB_A)).text
        assert [d["spec"]["target"]["userId"] for d in await kube.list_doppels(NAMESPACE, TEAM_A)] == [
            ALICE_A
        ]
        assert consent_values(emulator, team_a) == []
        assert (await kube.get_state(NAMESPACE, TEAM_A)) == {}

        # A consent request for carol: the external alice's click is refused, privately.
        assert "Asked <@U03CAROL>" in (await run("train @carol", BOB_A, channel=GENERAL_A)).text
        [value] = await until(lambda: consent_values(emulator, team_a))
        before = len(emulator.ephemeral_posts(PARTNERS_A, team_a))
        await bot.form(click(value, user=ALICE_B, user_team=TEAM_B, team=TEAM_A, channel=PARTNERS_A))
        await until(lambda: len(emulator.ephemeral_posts(PARTNERS_A, team_a)) > before)
        assert emulator.ephemeral_posts(PARTNERS_A, team_a)[-1]["text"] == REFUSAL
        assert await kube.get_doppel(NAMESPACE, TEAM_A, name_of("carol", TEAM_A)) is None
        assert emulator.posted(PARTNERS_A, team_a) == []

        # Another workspace, signed correctly, and org-wide envelopes (authorizations[0].team_id null)
        # naming B, or claiming an org install: all refused before anything runs.
        refused = await run("list", BOB_B, team=TEAM_B, channel=GENERAL_B)
        assert refused.status_code == 200 and refused.text == "This app serves another workspace."
        grid = {"enterprise_id": "E0GRID001", "team_id": None, "user_id": BOT_A, "is_bot": True}
        org_wide = [{**grid, "is_enterprise_install": True}]
        refused_before = caplog.text.count("refused: this bot serves team")
        for team, event_id in ((team_b, "EvOrg1"), (team_a, "EvOrg2")):
            payload = mention(
                emulator,
                team,
                BOB_B if team is team_b else BOB_A,
                "hi",
                GENERAL_A if team is team_a else GENERAL_B,
                event_id,
            )
            payload.update(enterprise_id="E0GRID001", authorizations=org_wide)
            answered = await bot.event(payload)  # 200: a refusal is an answer, Slack must not retry
            assert answered.status_code == 200
        # The events were acknowledged at once and refused by the workspace check after the ack.
        refused_teams = "refused: this bot serves team"
        await until(lambda: caplog.text.count(refused_teams) == refused_before + 2)
        await asyncio.sleep(0.5)
        assert emulator.posted(GENERAL_B, team_b) == [] and asked == []
        assert not [p for p in emulator.posted(GENERAL_A, team_a) if "hello" in p["text"]]
        # A member of A is answered as usual in A's own channel; in the shared one doppels stay silent.
        before = len(emulator.posted(GENERAL_A, team_a))
        await bot.event(mention(emulator, team_a, BOB_A, f"<@{BOT_A}> as alice hi", GENERAL_A, "EvOk"))
        assert (await bot.wait_posts(GENERAL_A, before + 1, team=team_a))[-1]["text"] == "hello"
        await bot.event(mention(emulator, team_a, BOB_A, f"<@{BOT_A}> as alice hi", PARTNERS_A, "EvOk2"))
        notice = await until(
            lambda: [p for p in emulator.ephemeral_posts(PARTNERS_A, team_a) if p["user"] == BOB_A]
        )
        assert notice[0]["text"] == SHARED_CHANNEL and emulator.posted(PARTNERS_A, team_a) == []


@pytest.mark.parametrize("store", ["secrets", "postgres"])
async def test_grid_workspace_and_org_wide_installs_find_their_tokens(
    store, bot_harness, bot_kube, slack_workspace, request
):
    """A workspace of Grid org E1 installs the app; org E2 installs it org-wide. With either store (the
    chart's Kubernetes Secrets, or its database), both are served, their doppels' progress messages are
    posted with their own tokens, and a member of E2 from another of its workspaces is welcome in B."""
    org_a, org_b, other_workspace = "E0GRIDA01", "E0GRIDB01", "T0789IJKL"
    emulator = OAuthSlackEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rate_scale=1000.0)
    team_a = emulator.add_team(acme(slack_workspace, org_a), token="xoxb-never-given-a", bot_user_id=BOT_A)
    team_b = emulator.add_team(globex(org_b), token="xoxb-never-given-b", bot_user_id=BOT_B)
    colleague = {
        "id": "W0B3CARL",
        "team_id": other_workspace,
        "name": "carl",
        "enterprise_user": {"id": "W0B3CARL", "enterprise_id": org_b, "teams": [other_workspace]},
    }
    emulator.add_external_user(colleague, GENERAL_B, team_b)
    slack = {
        "signingSecret": SIGNING_SECRET,
        "botToken": "",
        "clientId": CLIENT_ID,
        "clientSecret": CLIENT_SECRET,
    }
    # Installs from A (a workspace of org E1) and from all of org E2 (the Grid org's id) only.
    values: dict[str, Any] = {"slack": slack, "bot": {"installAllowlist": [TEAM_A, org_b]}}
    secrets = {}
    if store == "postgres":
        secrets[DATABASE_REF] = request.getfixturevalue("postgres_url")
    else:
        values["bot"]["databaseSecret"] = ""
    config = chart_config([CHART_DIR / "examples" / "values-scaled.yaml"], values, secrets)
    assert (config.database_url is None) is (store == "secrets")
    kmock, url = bot_kube
    with emulator:
        bot = await bot_harness(config, emulator=emulator)
        token_a = await install(bot, emulator, TEAM_A, enterprise_id=org_a)
        token_b = await install(bot, emulator, TEAM_B, enterprise_id=org_b, org_wide=True)
        if store == "postgres":
            installations: Any = SQLAlchemyInstallationStore(CLIENT_ID, sa.create_engine(config.database_url))
        else:
            installations = KubernetesSecretInstallationStore(api_client(url), NAMESPACE)

        def find(**ids: Any) -> str | None:
            found = installations.find_installation(**ids)
            return found.bot_token if found else None

        assert await asyncio.to_thread(find, enterprise_id=org_a, team_id=TEAM_A) == token_a
        assert (
            await asyncio.to_thread(find, enterprise_id=org_b, team_id=None, is_enterprise_install=True)
            == token_b
        )
        assert (
            await asyncio.to_thread(find, enterprise_id=org_b, team_id=TEAM_B) is None
        )  # not a workspace install

        # B's alice was trained before org E2 installed the app org-wide: her doppel names no org.
        earlier = doppel_body("alice", ALICE_B, phase="Pending", team=TEAM_B, namespace=NAMESPACE)
        earlier["metadata"]["annotations"] = {"doppel.dev/requested-by": BOB_B}
        await kube_for(url).create_doppel(NAMESPACE, earlier)

        grid_a = {"enterprise_id": org_a, "is_enterprise_install": "false"}
        grid_b = {"enterprise_id": org_b, "is_enterprise_install": "true"}
        trained_a = await bot.form(
            command("train @bob", user=BOB_A, team=TEAM_A, channel=GENERAL_A, **grid_a)
        )
        trained_b = await bot.form(
            command("train @bob", user=BOB_B, team=TEAM_B, channel=GENERAL_B, **grid_b)
        )
        assert "Training a doppel of bob" in trained_a.text and "Training a doppel of bob" in trained_b.text

        # Events as Slack sends them: a Grid workspace's; an org-wide install's (no team in authorizations).
        auth_a = [
            {
                "enterprise_id": org_a,
                "team_id": TEAM_A,
                "user_id": BOT_A,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ]
        auth_b = [
            {
                "enterprise_id": org_b,
                "team_id": None,
                "user_id": BOT_B,
                "is_bot": True,
                "is_enterprise_install": True,
            }
        ]
        text_a, text_b = f"<@{BOT_A}> as bob hi", f"<@{BOT_B}> as bob hi"
        await bot.event(
            mention(
                emulator,
                team_a,
                ALICE_A,
                text_a,
                GENERAL_A,
                "EvGa",
                enterprise_id=org_a,
                authorizations=auth_a,
            )
        )
        await bot.event(
            mention(
                emulator,
                team_b,
                ALICE_B,
                text_b,
                GENERAL_B,
                "EvGb",
                enterprise_id=org_b,
                authorizations=auth_b,
            )
        )
        await bot.event(
            mention(
                emulator,
                team_b,
                "W0B3CARL",
                text_b,
                GENERAL_B,
                "EvGc",
                enterprise_id=org_b,
                authorizations=auth_b,
            )
        )
        assert (
            "bob's doppel is still training" in (await bot.wait_posts(GENERAL_A, 1, team=team_a))[0]["text"]
        )
        answers_b = await bot.wait_posts(GENERAL_B, 2, team=team_b)
        assert all("bob's doppel is still training" in p["text"] for p in answers_b)

        for team in (TEAM_A, TEAM_B):
            patch_status(kmock, name_of("bob", team), {"phase": "Training", "samples": 30})
        patch_status(kmock, name_of("alice", TEAM_B), {"phase": "Training", "samples": 7})
        await notify_once(bot.bot)
        # The earlier doppel learnt its org from B's requests: its requester is told with the org's token.
        await until(
            lambda: any(
                "alice's doppel: scraped 7 samples" in p["text"]
                for c in list(team_b.messages)
                for p in emulator.posted(c, team_b)
            )
        )
        for team in (team_a, team_b):  # by direct message, in each workspace with its own token
            await until(
                lambda t=team: any(
                    "scraped 30 samples" in p["text"] for c in list(t.messages) for p in emulator.posted(c, t)
                )
            )
        posted_with = {c.team for c in emulator.calls_to("chat.postMessage") if "scraped" in str(c.params)}
        assert posted_with == {TEAM_A, TEAM_B}


def test_the_rate_profile_of_trained_doppels_follows_the_install_and_the_chart():
    """`/doppel train` writes the rate profile Slack applies to the app: one workspace's own token is an
    internal app (the CRD's default), OAuth across workspaces a non-Marketplace one, unless the chart says
    otherwise (a Marketplace listing); a profile Slack has no name for is refused at install time."""
    single = {"signingSecret": SIGNING_SECRET, "botToken": ACME_TOKEN}
    oauth = {
        "signingSecret": SIGNING_SECRET,
        "botToken": "",
        "clientId": CLIENT_ID,
        "clientSecret": CLIENT_SECRET,
    }
    assert chart_config([], {"slack": single}, {}).new_doppel_rate_profile() is None
    assert chart_config([], {"slack": oauth}, {}).new_doppel_rate_profile() == "non-marketplace"
    listed = {"slack": oauth, "bot": {"rateProfile": "marketplace"}}
    assert chart_config([], listed, {}).new_doppel_rate_profile() == "marketplace"
    with pytest.raises(HelmError, match="rateProfile"):
        render_chart([], {"slack": single, "bot": {"rateProfile": "gold"}})
