"""Installing the app (issue 27): only the workspaces the chart lists can complete the OAuth install, public
OAuth traffic stores nothing, `app_uninstalled` and `tokens_revoked` delete the workspace's tokens and stop
its doppels, and installing again resumes the doppels the revocation stopped. The real bot (Bolt under
uvicorn) with the Slack emulator's OAuth endpoints and kmock; events shaped as Slack documents them.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from tests.support.bot_fixtures import (
    BOT_NAMESPACE,
    CLIENT_ID,
    CLIENT_SECRET,
    NAMESPACE,
    TEAM_ID,
    OAuthSlackEmulator,
    as_team,
    bot_config,
    command_form,
    doppel_body,
    kube_for,
    name_of,
)
from tests.support.bot_steps import install, oauth_config, secret_token, until, until_async
from tests.support.slack_fixtures import BOT_USER_ID

from doppel.bot.installation_store import KubernetesSecretInstallationStore
from doppel.bot.kube import ANNOTATION_STOPPED, api_client

OTHER_TEAM = "T0GLOBEX9"


async def test_installs_only_from_the_allowlist_and_public_oauth_traffic_stores_nothing(
    bot_harness, bot_kube, slack_workspace
):
    kmock, url = bot_kube
    emulator = OAuthSlackEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rate_scale=1000.0)
    emulator.add_team(slack_workspace, token="xoxb-unused", bot_user_id=BOT_USER_ID)
    emulator.add_team(
        as_team(slack_workspace, OTHER_TEAM, "Globex"), token="xoxb-unused-2", bot_user_id="U0GDOPPEL"
    )
    with emulator:
        config = oauth_config(install_allowlist=frozenset({TEAM_ID}))
        bot = await bot_harness(config, emulator=emulator)
        store = KubernetesSecretInstallationStore(api_client(url), BOT_NAMESPACE)

        def objects() -> int:
            return sum(1 for key in list(kmock.objects) if not kmock.objects[key].deleted)

        async def finish(code: str | None) -> Any:
            page = await bot.http.get("/slack/install")
            state = re.search(r"state=([0-9a-f]+)", page.text).group(1)
            params = {"state": state, **({"code": code} if code else {})}
            return await bot.http.get(
                "/slack/oauth_redirect", params=params, headers={"Cookie": f"slack-app-oauth-state={state}"}
            )

        # 40 unauthenticated round trips (a fresh signed state each, a made-up code): no object stored.
        before = objects()
        answers = await asyncio.gather(*(finish(f"made-up-{i}") for i in range(40)))
        assert {a.status_code for a in answers} == {401} and objects() == before

        # A workspace not on the list completes Slack's side: refused, nothing stored, its token revoked.
        refused = await finish(emulator.grant(OTHER_TEAM))
        assert refused.status_code == 403 and "cannot be installed in this workspace" in refused.text
        assert objects() == before
        assert (
            await asyncio.to_thread(store.find_installation, enterprise_id=None, team_id=OTHER_TEAM) is None
        )
        assert emulator.revoked == [emulator.issued[-1]]
        # The listed one installs.
        done = await finish(emulator.grant(TEAM_ID))
        assert done.status_code == 200, done.text
        found = await asyncio.to_thread(store.find_installation, enterprise_id=None, team_id=TEAM_ID)
        assert found.bot_token == emulator.issued[-1]


async def test_uninstall_deletes_the_tokens_and_stops_the_doppels_until_installed_again(
    bot_harness, bot_kube, slack_workspace
):
    kmock, url = bot_kube
    emulator = OAuthSlackEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rate_scale=1000.0)
    emulator.add_team(slack_workspace, token="xoxb-unused", bot_user_id=BOT_USER_ID)
    with emulator:
        config = oauth_config()
        bot = await bot_harness(config, emulator=emulator)
        kube = kube_for(url)
        store = KubernetesSecretInstallationStore(api_client(url), BOT_NAMESPACE)

        def doppel_of(handle: str) -> Any:
            return kube.get_doppel(NAMESPACE, TEAM_ID, name_of(handle))

        await install(bot, emulator, TEAM_ID)
        trained = await bot.form(command_form("train <@U02BOB|bob>", user="U02BOB"))
        assert "Training a doppel of bob" in trained.text
        # Carol's doppel was suspended by a person before: the revocation leaves it alone, and so does the
        # reinstall (it stays suspended).
        carol = doppel_body("carol", "U03CAROL")
        carol["spec"]["suspend"] = True
        await kube.create_doppel(NAMESPACE, carol)
        secret_name = (await doppel_of("bob"))["spec"]["slack"]["tokenSecretRef"]["name"]

        def secret_exists() -> bool:
            return any(
                key[1] == NAMESPACE and key[2] == secret_name and not kmock.objects[key].deleted
                for key in list(kmock.objects)
            )

        assert secret_exists()
        # Slack's documented shapes: tokens_revoked names the revoked tokens' users, app_uninstalled none.
        for event_id, event in (
            ("EvRevoked", {"type": "tokens_revoked", "tokens": {"oauth": [], "bot": [BOT_USER_ID]}}),
            ("EvUninstalled", {"type": "app_uninstalled"}),
        ):
            payload = {
                "token": "legacy",
                "team_id": TEAM_ID,
                "api_app_id": "A0DOPPEL",
                "event": {**event, "event_ts": f"{time.time():.6f}"},
                "type": "event_callback",
                "event_id": event_id,
                "event_time": int(time.time()),
            }
            assert (await bot.event(payload)).status_code == 200
        bob = await until_async(
            lambda: doppel_of("bob"),
            lambda d: (d["metadata"].get("annotations") or {}).get(ANNOTATION_STOPPED),
        )
        assert bob["spec"]["suspend"] is True
        await until(lambda: not secret_exists())

        def installation() -> Any:
            return store.find_installation(enterprise_id=None, team_id=TEAM_ID)

        assert await asyncio.to_thread(installation) is None
        assert ANNOTATION_STOPPED not in (await doppel_of("carol"))["metadata"].get("annotations", {})

        # The workspace installs the app again: Bob's doppel resumes with the new token, Carol's stays
        # suspended.
        token = await install(bot, emulator, TEAM_ID)
        bob = await until_async(lambda: doppel_of("bob"), lambda d: d["spec"]["suspend"] is False)
        assert ANNOTATION_STOPPED not in bob["metadata"].get("annotations", {})
        assert await asyncio.to_thread(secret_token, url, NAMESPACE, secret_name) == token
        assert (await doppel_of("carol"))["spec"]["suspend"] is True


async def test_a_single_token_bot_restarted_with_a_valid_token_resumes_what_a_revocation_stopped(
    bot_harness, bot_kube, slack_emulator, slack_workspace
):
    """One bot token, no OAuth: `tokens_revoked` stops the doppels and deletes the token Secret; a restart
    with the same, revoked token resumes nothing; a restart with a new token Slack accepts writes it to the
    Secret and resumes the doppels the revocation stopped (docs/security.md), not those a person stopped."""
    _, url = bot_kube
    kube = kube_for(url)
    first = await bot_harness()
    assert (
        "Training a doppel of bob"
        in (await first.form(command_form("train <@U02BOB|bob>", user="U02BOB"))).text
    )
    carol = doppel_body("carol", "U03CAROL")
    carol["spec"]["suspend"] = True
    await kube.create_doppel(NAMESPACE, carol)

    def doppel_of(handle: str) -> Any:
        return kube.get_doppel(NAMESPACE, TEAM_ID, name_of(handle))

    secret_name = (await doppel_of("bob"))["spec"]["slack"]["tokenSecretRef"]["name"]
    revoked = {
        "token": "legacy",
        "team_id": TEAM_ID,
        "api_app_id": "A0DOPPEL",
        "event": {"type": "tokens_revoked", "tokens": {"oauth": [], "bot": [BOT_USER_ID]}, "event_ts": "1.0"},
        "type": "event_callback",
        "event_id": "EvRevokedSingle",
        "event_time": int(time.time()),
    }
    assert (await first.event(revoked)).status_code == 200
    await until_async(lambda: doppel_of("bob"), lambda d: d["spec"].get("suspend") is True)
    await until_async(
        lambda: asyncio.to_thread(secret_token, url, NAMESPACE, secret_name), lambda t: t is None
    )
    slack_emulator.revoke_token()

    # Restarted with the revoked token: auth.test refuses it, nothing resumes.
    await bot_harness()
    await asyncio.sleep(1.0)
    assert (await doppel_of("bob"))["spec"]["suspend"] is True

    # Restarted with a new token of the workspace: the Secret holds it and Bob's doppel resumes.
    new_token = "xoxb-acme-0002-new"
    slack_emulator.add_team(slack_workspace, token=new_token, bot_user_id=BOT_USER_ID)
    await bot_harness(bot_config(bot_token=new_token))
    bob = await until_async(lambda: doppel_of("bob"), lambda d: d["spec"]["suspend"] is False)
    assert ANNOTATION_STOPPED not in (bob["metadata"].get("annotations") or {})
    assert await asyncio.to_thread(secret_token, url, NAMESPACE, secret_name) == new_token
    assert (await doppel_of("carol"))["spec"]["suspend"] is True
