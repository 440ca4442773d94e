"""Mentions answered by the real vLLM CPU server, a slow vLLM, and the OAuth install (vLLM down and back:
test_bot_coldpool.py, where such a mention is held and answered when vLLM is back).

The bot runs under uvicorn on loopback; events are signed as Slack signs them; Web API calls go to the
Slack emulator; DoppelUsers live in kmock. The Ready doppel's served name is the tiny base model's, which
the real vLLM server answers for (the adapter path is the serving area's to test).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import replace

import pytest
import sqlalchemy as sa
from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore
from tests.support.bot_fixtures import (
    BOT_NAMESPACE,
    CHANNEL,
    CLIENT_ID,
    CLIENT_SECRET,
    NAMESPACE,
    TEAM_ID,
    OAuthSlackEmulator,
    bot_config,
    doppel_body,
    kube_for,
    mention_payload,
    say,
)
from tests.support.slack_fixtures import BOT_USER_ID

from doppel.bot.installation_store import KubernetesSecretInstallationStore
from doppel.bot.kube import api_client


@pytest.mark.vllm
async def test_mention_answered_in_thread_under_the_doppels_name(
    bot_harness, bot_kube, slack_emulator, vllm_server
):
    bot = await bot_harness(bot_config(vllm_url=vllm_server.base_url))
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="doppel-tiny"))
    root = say(slack_emulator, "U01ALICE", "deploy is at 5pm today")
    ts = say(slack_emulator, "U02BOB", f"<@{BOT_USER_ID}> as alice is it still 5pm?", thread_ts=root)

    started = time.monotonic()
    payload = mention_payload(
        f"<@{BOT_USER_ID}> as alice is it still 5pm?", ts, event_id="Ev0MENTION", thread_ts=root
    )
    response = await bot.event(payload)
    ack_s = time.monotonic() - started
    assert response.status_code == 200 and ack_s < 3.0

    posts = await bot.wait_posts(CHANNEL, 1, timeout=240)
    await asyncio.sleep(0.5)  # a reply split into several messages arrives as several posts
    posts = slack_emulator.posted(CHANNEL)
    assert all(p["thread_ts"] == root for p in posts)
    assert {p["username"] for p in posts} == {"alice-bot"}
    assert all(p.get("icon_emoji") or p.get("icon_url") for p in posts)
    assert all(p["text"].strip() for p in posts)
    replies = [c for c in slack_emulator.calls_to("conversations.replies") if c.params.get("ts") == root]
    assert replies, "the bot read the thread"


async def test_slow_vllm_gets_an_apology(bot_harness, bot_kube, slack_emulator):
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        bot = await bot_harness(bot_config(vllm_url=f"http://127.0.0.1:{port}", vllm_timeout_s=1.0))
        await kube_for(bot_kube[1]).create_doppel(
            NAMESPACE, doppel_body("alice", "U01ALICE", served_name="doppel-tiny")
        )
        ts = say(slack_emulator, "U02BOB", f"<@{BOT_USER_ID}> hi")
        started = time.monotonic()
        assert (await bot.event(mention_payload("hi", ts, event_id="EvSlow"))).status_code == 200
        assert time.monotonic() - started < 3.0
        posts = await bot.wait_posts(CHANNEL, 1, timeout=20)
        assert "can't answer right now" in posts[0]["text"]
    finally:
        server.close()


@pytest.mark.parametrize(("rotating", "store"), [(False, "kube"), (True, "kube"), (True, "sql")])
async def test_oauth_install_stores_an_installation_that_later_events_use(
    bot_harness, bot_kube, slack_workspace, caplog, tmp_path, rotating, store
):
    caplog.set_level(logging.DEBUG)
    emulator = OAuthSlackEmulator(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rotating=rotating, rate_scale=1000.0
    )
    team = emulator.add_team(slack_workspace, token="xoxb-never-given-to-the-bot", bot_user_id=BOT_USER_ID)
    with emulator:
        database = f"sqlite:///{tmp_path / 'bot.db'}" if store == "sql" else None
        config = replace(
            bot_config(),
            bot_token=None,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            database_url=database,
        )
        bot = await bot_harness(config, emulator=emulator)
        kube = kube_for(bot_kube[1])
        await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Training"))

        # Before the install, the workspace's events are not served.
        ts = say(emulator, "U02BOB", f"<@{BOT_USER_ID}> hi")
        await bot.event(mention_payload("hi", ts, event_id="EvBefore"))
        await asyncio.sleep(0.5)
        assert emulator.posted(CHANNEL, team) == []

        install = await bot.http.get("/slack/install")
        assert install.status_code == 200
        state = re.search(r"state=([^&\"'\s]+)", install.text).group(1)
        cookie = {"Cookie": f"slack-app-oauth-state={state}"}

        forged = await bot.http.get(
            "/slack/oauth_redirect",
            params={"code": emulator.grant(TEAM_ID), "state": "0" * 32},
            headers=cookie,
        )
        assert forged.status_code == 400
        assert not emulator.issued

        code = emulator.grant(TEAM_ID)
        done = await bot.http.get(
            "/slack/oauth_redirect", params={"code": code, "state": state}, headers=cookie
        )
        assert done.status_code == 200, done.text
        assert len(emulator.issued) == 1
        reused = await bot.http.get(
            "/slack/oauth_redirect", params={"code": code, "state": state}, headers=cookie
        )
        assert reused.status_code == 401 and len(emulator.issued) == 1  # a state is good once

        if store == "sql":
            installations = SQLAlchemyInstallationStore(CLIENT_ID, sa.create_engine(database))
        else:
            installations = KubernetesSecretInstallationStore(api_client(bot_kube[1]), BOT_NAMESPACE)

        def find(team_id):
            return installations.find_installation(enterprise_id=None, team_id=team_id)

        saved = await asyncio.to_thread(find, TEAM_ID)
        assert saved is not None and saved.bot_token == emulator.issued[0]
        assert await asyncio.to_thread(find, "T0OTHER01") is None

        ts = say(emulator, "U02BOB", f"<@{BOT_USER_ID}> hi again")
        assert (await bot.event(mention_payload("hi again", ts, event_id="EvAfter"))).status_code == 200
        posts = await bot.wait_posts(CHANNEL, 1, team=team)
        assert "still training" in posts[0]["text"]
        if rotating:
            # The token was about to expire: Bolt refreshed it through oauth.v2.access and stored the new one.
            assert len(emulator.issued) == 2
            saved = await asyncio.to_thread(find, TEAM_ID)
            assert saved.bot_token == emulator.issued[1]

    for secret in [*emulator.issued, CLIENT_SECRET, *emulator.refresh_tokens]:
        assert secret not in caplog.text
    # slack_sdk logged the token responses at DEBUG: the tokens were there to leak, and were redacted.
    assert "oauth.v2.access" in caplog.text, len(caplog.text)
    assert "[redacted]" in caplog.text
