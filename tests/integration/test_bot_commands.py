"""The bot over HTTP on loopback: signature checks, /doppel, consent, deduplication, workspace isolation.

Real Bolt app under uvicorn, requests signed as Slack signs them, Web API calls to the Slack emulator,
DoppelUsers in the kmock Kubernetes emulator. No model is needed here: the doppels are not Ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import quote

from aiohttp import web
from kubernetes.client import CustomObjectsApi
from slack_sdk import WebClient
from tests.support.bot_fixtures import (
    BOT_NAMESPACE,
    CHANNEL,
    NAMESPACE,
    SIGNING_SECRET,
    TEAM_ID,
    SocketModeSlack,
    action_form,
    as_team,
    bot_config,
    command_form,
    doppel_body,
    kube_for,
    mention_payload,
    name_of,
    say,
)
from tests.support.slack_fixtures import ACME_TOKEN

from doppel.bot.background import notify_once
from doppel.bot.kube import api_client
from doppel.bot.ledger import KubeEventLedger
from doppel.bot.server import create_bot


async def test_forged_and_stale_signatures_are_refused_without_side_effects(
    bot_harness, bot_kube, slack_emulator
):
    bot = await bot_harness()
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Training"))
    ts = say(slack_emulator, "U02BOB", "<@U0DOPPEL> hi")
    payload = mention_payload("<@U0DOPPEL> hi", ts, event_id="EvForged")

    forged = await bot.event(payload, secret="not-the-signing-secret")
    stale = await bot.event(payload, timestamp=int(time.time()) - 6 * 60)
    tampered_body = json.dumps(payload)
    from tests.support.bot_fixtures import sign

    headers = {"Content-Type": "application/json", **sign(tampered_body)}
    tampered = await bot.http.post(
        "/slack/events", content=tampered_body.replace("hi", "HI"), headers=headers
    )
    train = await bot.form(command_form("train <@U02BOB|bob>", user="U02BOB"), secret="wrong")

    assert [forged.status_code, stale.status_code, tampered.status_code, train.status_code] == [401] * 4
    await asyncio.sleep(0.5)
    assert slack_emulator.posted(CHANNEL) == []
    assert await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("bob")) is None
    # Nothing claimed either: the same event, signed properly, is still answered.
    assert (await bot.event(payload)).status_code == 200
    posts = await bot.wait_posts(CHANNEL, 1)
    assert "still training" in posts[0]["text"]


async def test_train_self_creates_doppel_and_forget_removes_it(bot_harness, bot_kube):
    bot = await bot_harness()
    kube = kube_for(bot_kube[1])

    started = time.monotonic()
    response = await bot.form(command_form("train <@U02BOB|bob>", user="U02BOB"))
    assert response.status_code == 200 and time.monotonic() - started < 3
    assert "Training a doppel of bob" in response.text
    created = await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("bob"))
    assert created is not None
    assert created["spec"]["target"] == {"userId": "U02BOB", "handle": "bob"}
    assert created["spec"]["slack"]["teamId"] == "T0ACME001"
    assert "rateProfile" not in created["spec"]["slack"]  # one workspace's own app: the CRD's default
    assert created["metadata"]["annotations"]["doppel.dev/requested-by"] == "U02BOB"

    listing = await bot.form(command_form("list", user="U03CAROL"))
    assert "*bob*: Pending" in listing.text
    again = await bot.form(command_form("train @bob", user="U02BOB"))
    assert "already has a doppel" in again.text

    refused = await bot.form(command_form("forget <@U02BOB|bob>", user="U03CAROL"))
    assert (
        "Only bob" in refused.text and await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("bob")) is not None
    )
    forgot = await bot.form(command_form("forget <@U02BOB|bob>", user="U02BOB"))
    assert "Forgot bob's doppel" in forgot.text
    assert await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("bob")) is None


async def test_status_switch_help_and_bad_commands(bot_harness, bot_kube):
    bot = await bot_harness()
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(
        NAMESPACE,
        doppel_body(
            "alice", "U01ALICE", phase="Training", samples=812, training={"step": 40, "totalSteps": 100}
        ),
    )
    status = await bot.form(command_form("status @alice", user="U02BOB"))
    assert "*alice*: Training (40% of 100 steps), 812 samples" in status.text
    refused = await bot.form(command_form("switch <@U01ALICE|alice>", user="U02BOB"))
    assert "Only alice, whoever asked for this doppel, or a workspace admin" in refused.text
    switched = await bot.form(command_form("switch <@U01ALICE|alice>", user="U01ALICE"))
    assert "alice's doppel now answers" in switched.text
    assert "(active)" in (await bot.form(command_form("list", user="U02BOB"))).text
    assert "Training" in (await bot.form(command_form("status", user="U02BOB"))).text
    assert "/doppel train <user>" in (await bot.form(command_form("help", user="U02BOB"))).text

    for text, expected in [
        ("dance", "unknown command `dance`"),
        ("train", "needs a user"),
        ("train @nobody-here", "no Slack user @nobody-here"),
        ("status @dave", "no doppel of dave"),
        ("list everything", "takes no argument"),
        ("train <bad>", "is not a Slack user"),
    ]:
        response = await bot.form(command_form(text, user="U02BOB"))
        assert response.status_code == 200
        assert expected in response.text, (text, response.text)
    assert [d["metadata"]["name"] for d in await kube.list_doppels(NAMESPACE, TEAM_ID)] == [name_of("alice")]


async def test_consent_flow_and_workspace_limit(bot_harness, bot_kube, slack_emulator):
    bot = await bot_harness(bot_config(max_doppels_per_workspace=2))
    kube = kube_for(bot_kube[1])

    async def dms(user, count):
        for _ in range(200):
            channel = slack_emulator.dm_channel(user)
            if channel and len(slack_emulator.posted(channel)) >= count:
                return slack_emulator.posted(channel)
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {count} direct messages to {user}")

    # Typed in a direct message between two people (a channel the bot cannot post in): still works.
    asked = await bot.form(command_form("train <@U01ALICE|alice>", user="U02BOB", channel="D0BOBANDAL"))
    assert asked.status_code == 200
    assert "Asked <@U01ALICE> for their approval" in asked.text
    assert await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("alice")) is None
    # The request reaches Alice privately (conversations.open), never a channel.
    request = (await dms("U01ALICE", 1))[-1]
    buttons = request["blocks"][1]["elements"]
    assert [b["text"]["text"] for b in buttons] == ["Approve", "Decline"]

    # Bob cannot approve on Alice's behalf: he is told so privately, and nothing is created.
    approve_value = buttons[0]["value"]
    assert (
        await bot.form(action_form("doppel_consent_approve", approve_value, user="U02BOB"))
    ).status_code == 200
    for _ in range(100):  # told privately (ephemeral, where he clicked): the channel sees nothing
        if slack_emulator.ephemeral_posts(CHANNEL):
            break
        await asyncio.sleep(0.05)
    [refusal] = slack_emulator.ephemeral_posts(CHANNEL)
    assert refusal["user"] == "U02BOB" and "Only <@U01ALICE> can answer this" in refusal["text"]
    assert await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("alice")) is None

    await bot.form(action_form("doppel_consent_approve", approve_value, user="U01ALICE"))
    assert "<@U01ALICE> approved" in (await dms("U02BOB", 1))[-1]["text"]
    created = await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("alice"))
    assert created is not None and created["metadata"]["annotations"]["doppel.dev/requested-by"] == "U02BOB"

    # Carol declines: nothing is created and Bob is told.
    await bot.form(command_form("train <@U03CAROL|carol>", user="U02BOB"))
    carol_request = (await dms("U03CAROL", 1))[-1]
    decline_value = carol_request["blocks"][1]["elements"][1]["value"]
    await bot.form(action_form("doppel_consent_decline", decline_value, user="U03CAROL"))
    assert "<@U03CAROL> declined" in (await dms("U02BOB", 2))[-1]["text"]
    assert await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("carol")) is None
    assert slack_emulator.posted(CHANNEL) == []  # nothing of this reached the channel

    # Someone who cannot be asked (a bot has no direct messages): a sentence, not an error.
    unreachable = await bot.form(command_form("train <@U0DOPPEL|doppel>", user="U02BOB"))
    assert unreachable.status_code == 200
    assert "could not ask <@U0DOPPEL> in a direct message (cannot_dm_bot)" in unreachable.text

    # The limit: bob trains himself (2 of 2), then dave is refused even with his own consent.
    await bot.form(command_form("train @bob", user="U02BOB"))
    refused = await bot.form(command_form("train @dave", user="U04DAVE"))
    assert "limit of 2 doppels" in refused.text
    assert await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("dave")) is None


async def test_consent_can_be_switched_off(bot_harness, bot_kube):
    bot = await bot_harness(bot_config(require_consent=False))
    response = await bot.form(command_form("train <@U01ALICE|alice>", user="U02BOB"))
    assert "Training a doppel of alice" in response.text
    assert await kube_for(bot_kube[1]).get_doppel(NAMESPACE, TEAM_ID, name_of("alice")) is not None


async def test_retries_of_one_event_are_answered_once_across_replicas_and_restarts(
    bot_harness, bot_kube, slack_emulator
):
    first, second = await bot_harness(), await bot_harness()
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Scraping"))
    ts = say(slack_emulator, "U02BOB", "<@U0DOPPEL> are you there?")
    payload = mention_payload("<@U0DOPPEL> are you there?", ts, event_id="Ev0RETRY1")

    responses = await asyncio.gather(first.event(payload), second.event(payload), first.event(payload))
    assert [r.status_code for r in responses] == [200, 200, 200]
    await first.wait_posts(CHANNEL, 1)
    # A third replica started later (a restart) shares the record too.
    third = await bot_harness()
    assert (await third.event(payload)).status_code == 200
    await asyncio.sleep(1.0)
    posts = slack_emulator.posted(CHANNEL)
    assert len(posts) == 1
    assert posts[0]["thread_ts"] == ts
    assert "alice's doppel is still training (Scraping)" in posts[0]["text"]
    # One claim, in one of the ledger's fixed ConfigMaps (no object per event).
    ledgers = [k for k in bot_kube[0].objects if k[1] == BOT_NAMESPACE and k[2].startswith("doppel-events-")]
    assert len(ledgers) == 1 and len(bot_kube[0].objects[ledgers[0]]["data"]) == 1


async def test_a_workspace_reaches_only_its_own_doppels(
    bot_harness, bot_kube, slack_emulator, slack_workspace
):
    other = as_team(slack_workspace, "T0OTHER01", "Other")
    other_team = slack_emulator.add_team(other, token="xoxb-other-0002-test", bot_user_id="U0DOPPEL")
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Training"))

    # One-workspace bot: a correctly signed request of another workspace is refused outright.
    bot = await bot_harness()
    response = await bot.form(command_form("list", user="U02BOB", team="T0OTHER01"))
    # Answered (200: Slack would retry an error), with a sentence instead of the listing.
    assert response.status_code == 200 and "another workspace" in response.text
    assert "alice" not in response.text

    # A bot serving the other workspace (its own token) sees its own, empty namespace.
    other_bot = await bot_harness(bot_config(bot_token=other_team.token))
    listing = await other_bot.form(command_form("list", user="U02BOB", team="T0OTHER01"))
    assert "No doppels in this workspace" in listing.text
    ts = say(slack_emulator, "U02BOB", "<@U0DOPPEL> as alice hi", team=other_team)
    await other_bot.event(
        mention_payload("<@U0DOPPEL> as alice hi", ts, event_id="EvOther", team="T0OTHER01")
    )
    posts = await other_bot.wait_posts(CHANNEL, 1, team=other_team)
    # Its workspace has no doppel alice: "as alice" selects nothing there, and none answers.
    assert "There is no active doppel in this workspace" in posts[0]["text"]
    assert slack_emulator.posted(CHANNEL) == []


async def test_progress_messages_reach_the_requester_once(bot_harness, bot_kube, slack_emulator):
    # Two replicas, each woken by its watch, plus a pass of each driven by hand at the same moment.
    bot = await bot_harness(bot_config(poll_interval_s=3600))
    other = await bot_harness(bot_config(poll_interval_s=3600))
    kube = kube_for(bot_kube[1])
    await bot.form(command_form("train @bob", user="U02BOB"))
    kmock = bot_kube[0]
    for count, (phase, extra) in enumerate([("Training", {"samples": 57}), ("Ready", {"samples": 57})], 1):
        key = next(k for k in kmock.objects if k[2] == name_of("bob") and "doppelusers" in str(k[0]))
        kmock.objects[key].patch({"status": {"phase": phase, **extra}})
        await asyncio.gather(notify_once(bot.bot), notify_once(other.bot))
        # In a direct message to whoever asked, not in the channel the command was typed in.
        dm = slack_emulator.dm_channel("U02BOB")
        assert dm is not None
        posts = await bot.wait_posts(dm, count, timeout=10)
        assert posts[-1]["text"].startswith("bob's doppel")
        await asyncio.sleep(0.5)
        assert len(slack_emulator.posted(dm)) == count
    assert slack_emulator.posted(CHANNEL) == []
    texts = [p["text"] for p in slack_emulator.posted(dm)]
    assert len(texts) == 2
    assert "scraped 57 samples, training started" in texts[0] and "is ready" in texts[1]
    # Told once: another pass (another replica, a restart) finds the phase already announced.
    assert await notify_once(bot.bot) == 0
    assert (await kube.get_doppel(NAMESPACE, TEAM_ID, name_of("bob")))["metadata"]["annotations"][
        "doppel.dev/notified-phase"
    ] == "Ready"
    assert SIGNING_SECRET not in str(texts)


async def test_the_thread_becomes_the_prompt_and_a_split_reply_several_posts(
    bot_harness, bot_kube, slack_emulator
):
    """Through the pluggable chat backend (what `doppel local` plugs its in-process model into)."""
    asked: list[tuple[str, list[dict[str, str]]]] = []

    async def chat(model, messages):
        asked.append((model, [dict(m) for m in messages]))
        return "sure, 5pm\n\nsee you there"

    bot = await bot_harness(chat=chat)
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="alice-v3"))
    await kube.create_doppel(NAMESPACE, doppel_body("bob", "U02BOB", served_name="bob-v1"))
    root = say(slack_emulator, "U01ALICE", "deploy is at 5pm &amp; not later")
    # The doppel answered in this thread before (posted as the bot does, through the Web API).
    WebClient(token=ACME_TOKEN, base_url=slack_emulator.base_url).chat_postMessage(
        channel=CHANNEL, thread_ts=root, text="told you so", username="alice-bot"
    )
    ts = say(slack_emulator, "U03CAROL", "<@U0DOPPEL> as alice still on, <@U02BOB>?", thread_ts=root)
    await bot.event(
        mention_payload(
            "<@U0DOPPEL> as alice still on, <@U02BOB>?", ts, event_id="EvP", thread_ts=root, user="U03CAROL"
        )
    )
    posts = await bot.wait_posts(CHANNEL, 3)  # the earlier alice-bot message + two new ones
    assert [p["text"] for p in posts[1:]] == ["sure, 5pm", "see you there"]
    assert {p["username"] for p in posts[1:]} == {"alice-bot"} and {p["thread_ts"] for p in posts} == {root}
    model, messages = asked[0]
    assert model == "alice-v3"
    assert messages[0]["role"] == "system" and "Alice" in messages[0]["content"]
    # The doppel's earlier reply counts as Alice's own (assistant) turn; the selector is gone, mentions read.
    assert messages[1:] == [
        {"role": "user", "content": "(a new thread in #general)"},
        {"role": "assistant", "content": "deploy is at 5pm & not later\ntold you so"},
        {"role": "user", "content": "Carol Diaz: @doppel still on, @bobby?"},
    ]


@contextlib.asynccontextmanager
async def response_url() -> AsyncIterator[tuple[str, list[dict]]]:
    """A command's response_url on loopback: its address, and what was posted to it."""
    received: list[dict] = []

    async def answer(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/response", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/response", received
    finally:
        await runner.cleanup()


async def test_a_slow_command_is_acknowledged_in_time_and_answered_later(
    bot_harness, bot_kube, slack_emulator
):
    async with response_url() as (url, received):
        try:
            bot = await bot_harness()
            await bot.form(command_form("help", user="U02BOB"))  # Bolt checks its token once, at the start
            slack_emulator.latency = 2.5  # every Slack API answer takes 2.5 s today
            form = command_form("train @bob", user="U02BOB").replace(
                "response_url=http%3A%2F%2F127.0.0.1%3A9%2Funused", f"response_url={quote(url, safe='')}"
            )
            started = time.monotonic()
            response = await bot.form(form)
            assert time.monotonic() - started < 3.0
            assert response.status_code == 200 and "Working on it" in response.text
            for _ in range(200):
                if received:
                    break
                await asyncio.sleep(0.05)
            assert "Training a doppel of bob" in received[0]["text"]
            assert await kube_for(bot_kube[1]).get_doppel(NAMESPACE, TEAM_ID, name_of("bob")) is not None
        finally:
            slack_emulator.latency = 0.0


async def test_socket_mode_answers_mentions_and_commands(bot_kube, slack_emulator):
    """No public URL: the bot connects out (apps.connections.open, then a websocket) and acknowledges each
    envelope over it. This is what `doppel local --socket-mode` runs."""
    app_token = "xapp-1-A0-socket"
    slack = SocketModeSlack(slack_emulator, app_token)
    await slack.start()
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Training"))
    config = replace(bot_config(app_token=app_token), slack_api_url=slack_emulator.base_url)
    bot = create_bot(config, kube_server=bot_kube[1])
    task = asyncio.create_task(bot.serve_socket_mode())
    try:
        ts = say(slack_emulator, "U02BOB", "<@U0DOPPEL> hi")
        ack = await slack.send(
            "events_api", mention_payload("<@U0DOPPEL> hi", ts, event_id="EvSock"), "env-1"
        )
        assert ack["envelope_id"] == "env-1"
        for _ in range(200):
            if slack_emulator.posted(CHANNEL):
                break
            await asyncio.sleep(0.05)
        assert "alice's doppel is still training" in slack_emulator.posted(CHANNEL)[0]["text"]
        command = dict(urllib.parse.parse_qsl(command_form("list", user="U02BOB")))
        listed = await slack.send("slash_commands", command, "env-2")
        assert "*alice*: Training" in listed["payload"]["text"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await slack.stop()


async def test_progress_is_noticed_through_the_watch_without_waiting_for_a_poll(
    bot_harness, bot_kube, slack_emulator
):
    bot = await bot_harness(bot_config(poll_interval_s=3600))
    await bot.form(command_form("train @bob", user="U02BOB"))
    await asyncio.sleep(0.5)  # the watch is established
    # The operator reports a failure through the status subresource, over the API.
    api = CustomObjectsApi(api_client(bot_kube[1]))
    status = {"status": {"phase": "Failed", "reason": "only 3 samples"}}
    await asyncio.to_thread(
        api.patch_namespaced_custom_object_status,
        "doppel.dev",
        "v1alpha1",
        NAMESPACE,
        "doppelusers",
        name_of("bob"),
        status,
    )
    for _ in range(200):
        if slack_emulator.dm_channel("U02BOB"):
            break
        await asyncio.sleep(0.05)
    posts = await bot.wait_posts(slack_emulator.dm_channel("U02BOB"), 1, timeout=10)
    assert posts[0]["text"] == "bob's doppel failed: only 3 samples."


async def test_slack_url_verification_is_answered_only_when_signed(bot_harness):
    bot = await bot_harness()
    challenge = {
        "token": "legacy",
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
        "type": "url_verification",
    }
    answered = await bot.event(challenge)
    assert answered.status_code == 200 and answered.json() == {"challenge": challenge["challenge"]}
    assert (await bot.event(challenge, secret="forged")).status_code == 401


async def test_event_claims_expire(bot_kube):
    kube = kube_for(bot_kube[1])
    lasting, expiring = KubeEventLedger(kube, BOT_NAMESPACE, 3600), KubeEventLedger(kube, BOT_NAMESPACE, -1)
    assert await lasting.claim(TEAM_ID, "Ev1") and not await lasting.claim(TEAM_ID, "Ev1")
    # A claim past its expiry can be claimed again (and a sweep deletes it); others stay.
    assert await expiring.claim(TEAM_ID, "Ev2")
    assert await expiring.claim(TEAM_ID, "Ev2")
    assert not await expiring.claim(TEAM_ID, "Ev1")
    assert await lasting.sweep() == 1
    assert not await lasting.claim(TEAM_ID, "Ev1")


async def test_no_token_in_the_logs_of_a_mention_and_a_train(bot_harness, bot_kube, slack_emulator, caplog):
    caplog.set_level(logging.DEBUG)
    bot = await bot_harness()
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Training"))
    ts = say(slack_emulator, "U02BOB", "<@U0DOPPEL> hi")
    await bot.event(mention_payload("<@U0DOPPEL> hi", ts, event_id="EvLogs"))
    await bot.form(command_form("train @bob", user="U02BOB"))  # writes the token into a Secret
    await bot.wait_posts(CHANNEL, 1)
    assert "chat.postMessage" in caplog.text  # slack_sdk's DEBUG logs of the calls were captured
    assert ACME_TOKEN not in caplog.text and SIGNING_SECRET not in caplog.text


async def test_people_whose_handles_make_the_same_name_keep_their_own_doppels(
    bot_harness, bot_kube, slack_emulator
):
    """`sam-lee` and `sam.lee` are two people whose handles rewrite alike: neither reaches the other's
    doppel with status, train, switch or forget, and each gets an object of their own."""
    slack_emulator.team.users.append(
        {"id": "U09SAMDASH", "team_id": TEAM_ID, "name": "sam-lee", "real_name": "Sam Dash", "profile": {}}
    )
    bot = await bot_harness(bot_config(require_consent=True))
    kube = kube_for(bot_kube[1])

    async def run(text: str, user: str) -> str:
        return (await bot.form(command_form(text, user=user))).text

    async def targets() -> dict[str, str]:
        return {
            d["metadata"]["name"]: d["spec"]["target"]["userId"]
            for d in await kube.list_doppels(NAMESPACE, TEAM_ID)
        }

    assert "Training a doppel of sam-lee" in await run("train <@U09SAMDASH|sam-lee>", "U09SAMDASH")
    # Sam Lee (sam.lee) asks about, switches to and forgets "their" doppel: there is none of them.
    for verb in ("status", "switch", "forget"):
        assert "There is no doppel of sam.lee" in await run(f"{verb} <@U05SAML|sam.lee>", "U05SAML")
    assert await targets() == {name_of("sam-lee"): "U09SAMDASH"}
    # Sam Lee trains their own: a second object, its name unique to them (the handle was rewritten).
    assert "Training a doppel of sam.lee" in await run("train @sam.lee", "U05SAML")
    mine = name_of("sam.lee", TEAM_ID, "U05SAML")
    assert mine != name_of("sam-lee")
    assert await targets() == {name_of("sam-lee"): "U09SAMDASH", mine: "U05SAML"}
    assert "Forgot sam.lee's doppel" in await run("forget @sam.lee", "U05SAML")
    assert await targets() == {name_of("sam-lee"): "U09SAMDASH"}

    # An object of sam.lee named before names carried a hash (`sam-lee-…`) is still found by its person,
    # and sam-lee, wanting that plain name, gets one with the hash of theirs.
    await run("forget @sam-lee", "U09SAMDASH")
    await kube.create_doppel(NAMESPACE, doppel_body("sam.lee", "U05SAML", phase="Training"))
    assert "*sam.lee*: Training" in await run("status @sam.lee", "U05SAML")
    assert "There is no doppel of sam-lee" in await run("status <@U09SAMDASH|sam-lee>", "U09SAMDASH")
    assert "already has a doppel" in await run("train @sam.lee", "U05SAML")
    assert "Training a doppel of sam-lee" in await run("train @sam-lee", "U09SAMDASH")
    found = await targets()
    assert found[name_of("sam.lee")] == "U05SAML" and sorted(found.values()) == ["U05SAML", "U09SAMDASH"]


async def test_a_command_that_slack_fails_gets_an_apology_fast_or_late(bot_harness, bot_kube, slack_emulator):
    """Slack (or Kubernetes) raising under a command: an apology, as the acknowledgement when it fails fast,
    through the command's response_url when it fails late; never no answer at all."""
    async with response_url() as (url, received):
        try:
            bot = await bot_harness()
            await bot.form(command_form("help", user="U02BOB"))  # Bolt checks its token once, at the start
            slack_emulator.fail_with("users.list", "internal_error")
            fast = await bot.form(command_form("train @bob", user="U02BOB"))
            assert fast.status_code == 200 and "Sorry, I couldn't do that" in fast.text

            slack_emulator.latency = 2.0  # and slow today: the answer comes later
            slack_emulator.fail_with("users.list", "internal_error")
            form = command_form("train @bob", user="U02BOB").replace(
                "response_url=http%3A%2F%2F127.0.0.1%3A9%2Funused", f"response_url={quote(url, safe='')}"
            )
            late = await bot.form(form)
            assert late.status_code == 200 and "Working on it" in late.text
            for _ in range(400):
                if received:
                    break
                await asyncio.sleep(0.05)
            assert received and "Sorry, I couldn't do that" in received[0]["text"]
            assert await kube_for(bot_kube[1]).get_doppel(NAMESPACE, TEAM_ID, name_of("bob")) is None
        finally:
            slack_emulator.latency = 0.0
