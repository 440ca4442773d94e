"""Each mention answered exactly once, never a bot's, never a ping; answers through retraining; a bounded,
signed-first HTTP intake; state that public endpoints cannot grow.

The real bot under uvicorn on loopback, events signed as Slack signs them and shaped as Slack documents
them (an `app_mention` with `edited`, `message_changed`, bot mentions with `bot_id`/`bot_profile`, classic
`bot_message`, retries with `X-Slack-Retry-Num`), Web API calls to the Slack emulator, DoppelUsers in kmock.
The model is the pluggable chat backend (what `doppel local` plugs its in-process model into).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock as kmock_lib
import pytest
import yaml
from click.testing import CliRunner
from tests.support.bot_fixtures import (
    BOT_NAMESPACE,
    CHANNEL,
    CLIENT_ID,
    CLIENT_SECRET,
    NAMESPACE,
    TEAM_ID,
    OAuthSlackEmulator,
    bot_config,
    command_form,
    doppel_body,
    kube_for,
    mention_payload,
    name_of,
    say,
    sign,
)
from tests.support.bot_steps import oauth_config
from tests.support.helm import find_manifest, render_chart
from tests.support.slack_emulator import SlackEmulator
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID
from tests.support.vllm_fixtures import free_port

from doppel.api import DoppelUserSpec, TrainDefaults
from doppel.bot.config import DEFAULT_SCOPES
from doppel.bot.held import LABEL_HELD
from doppel.bot.kube import LABEL_EVENT
from doppel.bot.ledger import KubeEventLedger, ledger_configmap
from doppel.bot.logic import event_key
from doppel.cli import main
from doppel.operator.config import OperatorConfig
from doppel.operator.jobs import Owner, job_manifest
from doppel.slack.conversation import DEFAULT_BUDGET_CHARS

ROOT = Path(__file__).resolve().parents[2]


def recording_chat(reply: str = "sure, 5pm") -> tuple[list[tuple[str, Any]], Any]:
    asked: list[tuple[str, Any]] = []

    async def chat(model: str, messages: Any) -> str:
        asked.append((model, messages))
        return reply

    return asked, chat


def edited(payload: dict[str, Any], text: str, event_id: str) -> dict[str, Any]:
    """The `app_mention` Slack sends when a mention is edited: a new event id, the original message's ts,
    the new text and an `edited` stamp."""
    event = dict(
        payload["event"], text=text, edited={"user": payload["event"]["user"], "ts": str(time.time())}
    )
    return dict(payload, event=event, event_id=event_id)


def message_changed(payload: dict[str, Any], text: str, event_id: str) -> dict[str, Any]:
    """The `message` event of subtype `message_changed` for the same edit (apps subscribed to messages)."""
    original = payload["event"]
    now = f"{time.time():.6f}"
    event = {
        "type": "message",
        "subtype": "message_changed",
        "hidden": True,
        "channel": original["channel"],
        "ts": now,
        "event_ts": now,
        "message": {
            "type": "message",
            "user": original["user"],
            "text": text,
            "edited": {"user": original["user"], "ts": now},
            "ts": original["ts"],
        },
        "previous_message": {"type": "message", "user": original["user"], "text": original["text"]},
    }
    return dict(payload, event=event, event_id=event_id)


async def settle(seconds: float = 0.8) -> None:
    """Give the worker time to post anything it (wrongly) would."""
    await asyncio.sleep(seconds)


async def test_a_mention_edited_retried_and_redelivered_is_answered_once(
    bot_harness, bot_kube, slack_emulator
):
    asked, chat = recording_chat()
    bot = await bot_harness(chat=chat)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    await settle()  # the claim sweeper's first pass, at start
    started = len(list(bot_kube[0]))
    text = f"<@{BOT_USER_ID}> is the deploy at 5?"
    ts = say(slack_emulator, "U02BOB", text)
    original = mention_payload(text, ts, event_id="Ev0ORIGINAL")
    assert (await bot.event(original)).status_code == 200
    await bot.wait_posts(CHANNEL, 1)

    # Slack's retry of the same event (it thought the ack was late), the edit as a new app_mention, the
    # same edit as message_changed, and the edit's own retry.
    fixed = f"<@{BOT_USER_ID}> is the deploy at 5pm?"
    body = json.dumps(original)
    retry = {
        "Content-Type": "application/json",
        "X-Slack-Retry-Num": "1",
        "X-Slack-Retry-Reason": "http_timeout",
    }
    responses = [
        await bot.http.post("/slack/events", content=body, headers={**retry, **sign(body)}),
        await bot.event(edited(original, fixed, "Ev0EDITED1")),
        await bot.event(message_changed(original, fixed, "Ev0CHANGED")),
        await bot.event(edited(original, fixed, "Ev0EDITED1")),
    ]
    assert [r.status_code for r in responses] == [200] * 4
    await settle()
    assert len(slack_emulator.posted(CHANNEL)) == 1 and len(asked) == 1
    # Deduplication is a read and a write per delivery; expired claims are swept elsewhere (never listed).
    requests = [r for r in list(bot_kube[0])[started:] if r.resource and r.resource.plural == "configmaps"]
    assert requests and not [r for r in requests if r.action == type(r.action).LIST]


async def test_two_replicas_racing_on_a_mention_and_its_edit_answer_once(
    bot_harness, bot_kube, slack_emulator
):
    asked, chat = recording_chat()
    first, second = await bot_harness(chat=chat), await bot_harness(chat=chat)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    text = f"<@{BOT_USER_ID}> standup at 10?"
    original = mention_payload(text, say(slack_emulator, "U02BOB", text), event_id="Ev0RACE1")
    fixed = edited(original, f"<@{BOT_USER_ID}> standup at 10:30?", "Ev0RACE2")
    sent = await asyncio.gather(first.event(original), second.event(fixed), second.event(original))
    assert [r.status_code for r in sent] == [200] * 3
    await first.wait_posts(CHANNEL, 1)
    await settle()
    assert len(slack_emulator.posted(CHANNEL)) == 1 and len(asked) == 1


async def test_mentions_by_bots_and_by_itself_are_not_answered(bot_harness, bot_kube, slack_emulator):
    asked, chat = recording_chat()
    bot = await bot_harness(chat=chat)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    text = f"<@{BOT_USER_ID}> ping"
    # Another app's bot user (modern: bot_id and bot_profile beside its user id).
    by_app = mention_payload(
        text, say(slack_emulator, "U0ECHOBOT", text), event_id="EvBotApp", user="U0ECHOBOT"
    )
    by_app["event"].update(
        bot_id="B0ECHO", bot_profile={"id": "B0ECHO", "app_id": "A0ECHO", "name": "echo", "team_id": TEAM_ID}
    )
    # A classic bot_message (an incoming webhook, a legacy integration): no user at all.
    legacy = mention_payload(text, say(slack_emulator, "U02BOB", text), event_id="EvBotLegacy")
    legacy["event"].pop("user")
    legacy["event"].update(subtype="bot_message", bot_id="B0HOOK", username="deploy-hook")
    # The bot's own message mentioning itself (an earlier reply quoting it).
    itself = mention_payload(
        text, say(slack_emulator, BOT_USER_ID, text), event_id="EvSelf", user=BOT_USER_ID
    )
    for payload in (by_app, legacy, itself):
        assert (await bot.event(payload)).status_code == 200
    await settle()
    assert slack_emulator.posted(CHANNEL) == [] and asked == []

    # A person's mention right after is answered: the bot was listening all along.
    human = mention_payload(text, say(slack_emulator, "U02BOB", text), event_id="EvHuman")
    await bot.event(human)
    assert (await bot.wait_posts(CHANNEL, 1))[0]["username"] == "alice-bot"


async def test_replies_never_ping_anyone(bot_harness, bot_kube, slack_emulator):
    reply = (
        "<!channel> heads up <@U02BOB>, ask <@U0ECHOBOT|echo> in <#C01GENERAL|general>\n\n"
        "<!here> and <!everyone>, <!subteam^S0ONCALL|@oncall> too: "
        "see <https://example.com/runbook|the runbook> & plain @here"
    )
    _, chat = recording_chat(reply)
    bot = await bot_harness(chat=chat)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    text = f"<@{BOT_USER_ID}> what's up?"
    await bot.event(mention_payload(text, say(slack_emulator, "U03CAROL", text), event_id="EvPing"))
    posts = await bot.wait_posts(CHANNEL, 2)
    texts = [p["text"] for p in posts]
    joined = "\n".join(texts)
    assert not re.search(r"<[@#!]", joined), joined  # no user, channel, broadcast or group mention left
    assert "@bobby" in texts[0]  # Bob, by the display name users.info gives
    assert "#general" in texts[0] and "@oncall" in texts[1]
    assert "the runbook (<https://example.com/runbook>)" in texts[1]  # links stay links, showing their target
    assert not re.search(r"@(channel|here|everyone)\b", joined)  # not even as plain words
    calls = [c for c in slack_emulator.calls_to("chat.postMessage") if c.params.get("username")]
    assert calls and all(str(c.params.get("link_names")).lower() in {"0", "false"} for c in calls)


async def test_slack_rate_limits_are_waited_out_and_failures_get_an_apology(
    bot_harness, bot_kube, slack_emulator
):
    _, chat = recording_chat("on it")
    bot = await bot_harness(chat=chat)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    # Two 429s (Retry-After: 1) on the reply: slack_sdk's retry handler waits them out; the reply arrives.
    slack_emulator.fail("chat.postMessage", 2, 429)
    text = f"<@{BOT_USER_ID}> status?"
    first = say(slack_emulator, "U02BOB", text)
    await bot.event(mention_payload(text, first, event_id="Ev429"))
    posts = await bot.wait_posts(CHANNEL, 1, timeout=20)
    assert posts[0]["text"] == "on it" and posts[0]["thread_ts"] == first
    assert len([c for c in slack_emulator.calls_to("chat.postMessage") if c.status == 429]) == 2

    # Slack keeps failing to show the thread (beyond the retries): an apology in the thread, not silence.
    slack_emulator.fail("conversations.history", 10, 500)  # the channel's recent messages, the prompt
    second = say(slack_emulator, "U02BOB", text)
    await bot.event(mention_payload(text, second, event_id="Ev500"))
    posts = await bot.wait_posts(CHANNEL, 2, timeout=20)
    assert posts[1]["thread_ts"] == second and "Sorry" in posts[1]["text"] and "username" not in posts[1]


def posts_limited(workspace: dict[str, Any], burst: float) -> SlackEmulator:
    """An emulator of `workspace` whose chat.postMessage allows a message a second per channel after
    `burst`, as Slack's does; every other method is fast."""
    emulator = SlackEmulator(rate_scale=1000.0, post_limit=(1.0, burst))
    emulator.add_team(workspace, token=ACME_TOKEN, bot_user_id=BOT_USER_ID)
    return emulator


async def alice_answering_yes(bot_harness: Any, bot_kube: Any, emulator: SlackEmulator) -> Any:
    """The bot on `emulator`, with a served doppel alice whose every answer is "yes"."""
    _, chat = recording_chat("yes")
    bot = await bot_harness(chat=chat, emulator=emulator)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    return bot


async def mentions_at_once(
    bot: Any, emulator: SlackEmulator, count: int, prefix: str
) -> list[dict[str, Any]]:
    """`count` mentions by Bob in #general, sent at once; every one is acknowledged with 200."""
    payloads = []
    for i in range(count):
        text = f"<@{BOT_USER_ID}> question {i}"
        payloads.append(mention_payload(text, say(emulator, "U02BOB", text), event_id=f"{prefix}{i}"))
    assert {r.status_code for r in await asyncio.gather(*(bot.event(p) for p in payloads))} == {200}
    return payloads


async def test_eight_mentions_in_a_second_under_slacks_real_channel_limit_are_all_answered(
    bot_harness, bot_kube, slack_workspace
):
    # chat.postMessage as Slack limits it: about one message a second per channel, a short burst allowed.
    with posts_limited(slack_workspace, burst=3.0) as emulator:
        bot = await alice_answering_yes(bot_harness, bot_kube, emulator)
        payloads = await mentions_at_once(bot, emulator, 8, "EvBurst")
        posts = await bot.wait_posts(CHANNEL, 8, timeout=60)
        assert sorted(p["thread_ts"] for p in posts) == sorted(p["event"]["ts"] for p in payloads)
        assert all(p["text"] == "yes" for p in posts)
        assert [c for c in emulator.calls_to("chat.postMessage") if c.status == 429]  # the limit was hit


async def test_a_channel_queued_behind_slacks_limit_does_not_hold_up_other_channels(
    bot_harness, bot_kube, slack_workspace
):
    """A hundred mentions in #general wait their turn to post (one message a second per channel); a mention in
    #engineering meanwhile is answered at once, not after them."""
    with posts_limited(slack_workspace, burst=1.0) as emulator:
        bot = await alice_answering_yes(bot_harness, bot_kube, emulator)
        await mentions_at_once(bot, emulator, 100, "EvQueue")
        await bot.wait_posts(CHANNEL, 2, timeout=20)  # #general's queue is draining, a message a second
        other, text = "C02ENG", f"<@{BOT_USER_ID}> a question elsewhere"
        ts = say(emulator, "U02BOB", text, channel=other)
        await bot.event(mention_payload(text, ts, event_id="EvElsewhere", channel=other))
        [answer] = await bot.wait_posts(other, 1, timeout=5)
        assert answer["thread_ts"] == ts
        assert len(emulator.posted(CHANNEL)) < 30  # most of #general's answers are still waiting


async def test_a_mention_is_answered_when_the_dedup_ledger_is_unreachable(
    bot_harness, bot_kube, slack_emulator
):
    _, chat = recording_chat("here")
    unreachable = KubeEventLedger(kube_for(f"http://127.0.0.1:{free_port()}"), BOT_NAMESPACE, 3600)
    bot = await bot_harness(chat=chat, ledger=unreachable)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    text = f"<@{BOT_USER_ID}> anyone?"
    await bot.event(mention_payload(text, say(slack_emulator, "U02BOB", text), event_id="EvNoLedger"))
    assert (await bot.wait_posts(CHANNEL, 1, timeout=20))[0]["text"] == "here"


async def test_a_doppel_answers_with_its_served_adapter_while_it_retrains(
    bot_harness, bot_kube, slack_emulator
):
    asked, chat = recording_chat("still me")
    bot = await bot_harness(chat=chat)
    kube = kube_for(bot_kube[1])
    # Each stage of a retrain (spec edit, schedule) keeps the adapter that serves in status.adapter.
    stages = {
        "scraping": {"phase": "Scraping"},
        "queued": {"phase": "Pending", "reason": "Queued"},
        "training": {"phase": "Training", "training": {"step": 3, "totalSteps": 10}},
        "registering": {"phase": "Registering"},
        "failed": {"phase": "Failed", "reason": "TrainFailed", "message": "out of memory"},
    }
    for name, status in stages.items():
        body = doppel_body(name, "U01ALICE", served_name=f"{name}-v1")
        body["status"].update(status)
        await kube.create_doppel(NAMESPACE, body)
    await kube.create_doppel(NAMESPACE, doppel_body("newbie", "U02BOB", phase="Training"))  # never Ready

    for count, name in enumerate([*stages, "newbie"], 1):
        text = f"<@{BOT_USER_ID}> as {name} are you there?"
        await bot.event(mention_payload(text, say(slack_emulator, "U03CAROL", text), event_id=f"Ev{name}"))
        posts = await bot.wait_posts(CHANNEL, count)
        if name == "newbie":
            assert "newbie's doppel is still training" in posts[-1]["text"]
        else:
            assert posts[-1]["text"] == "still me" and posts[-1]["username"] == f"{name}-bot"
    assert [model for model, _ in asked] == [f"{name}-v1" for name in stages]


async def test_http_intake_is_bounded_signed_first_and_answers_bad_bodies_briefly(
    bot_harness, bot_kube, slack_emulator, caplog
):
    caplog.set_level(logging.INFO)
    bot = await bot_harness()

    async def post(body: bytes, content_type: str = "application/json", signed: bool = True) -> Any:
        headers = {"Content-Type": content_type}
        if signed:
            headers.update(sign(body))
        return await bot.http.post("/slack/events", content=body, headers=headers)

    # Unsigned junk: refused on the signature, whatever it holds; nothing parsed, nothing logged as an error.
    for junk in (b"{not json", b"\xff\xfe\x00garbage", b"payload=%7Bnot"):
        assert (await post(junk, signed=False)).status_code == 401
    # A huge unsigned body is refused from its Content-Length, before it is read.
    started = time.monotonic()
    huge = await bot.http.post(
        "/slack/events", content=b"x" * (20 << 20), headers={"Content-Type": "application/json"}
    )
    assert huge.status_code == 413 and time.monotonic() - started < 10

    # The same without a Content-Length (chunked): refused once the limit is passed, the rest not read.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * (1 << 20)

    streamed = await bot.http.post(
        "/slack/events", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    # Only POSTs are Slack's.
    assert (await bot.http.get("/slack/events")).status_code == 405
    # A client gone half-way through its body: nothing to answer, nothing logged as an error (uvicorn's
    # own logger, where a failing request's traceback would go, does not reach the root), and the bot
    # serves the next request as before.
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(caplog.handler)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", bot.port)
        writer.write(b"POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.2)
    finally:
        uvicorn_errors.removeHandler(caplog.handler)
    assert (await bot.http.get("/healthz")).status_code == 200
    # Signed but malformed (Slack would never, a broken proxy might): 400 with one line.
    for bad, ctype in (
        (b"{not json", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"payload=%7Bnot", "application/x-www-form-urlencoded"),
        (b"payload=\xff", "application/x-www-form-urlencoded"),
    ):
        response = await post(bad, ctype)
        assert response.status_code == 400 and response.text == "malformed request body", bad
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    # The good ones still work.
    help_form = command_form("help", user="U02BOB").encode()
    assert "/doppel train" in (await post(help_form, "application/x-www-form-urlencoded")).text


def _readme_scopes(readme: str) -> list[set[str]]:
    """Each list of scopes the docs give after the words "bot scopes"."""
    lists = re.findall(r"bot scopes((?:\s*`[^`]+`(?: \([^)]*\))?(?:,| and)?)+)", readme)
    return [set(re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", found))) for found in lists]


async def test_oauth_scopes_have_one_source_of_truth(bot_harness, bot_kube, slack_workspace):
    manifest = yaml.safe_load((ROOT / "charts/doppel/examples/slack-app-manifest.yaml").read_text())
    manifest_scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert manifest_scopes == set(DEFAULT_SCOPES)
    # What the scrape Job and the private messages need is there.
    assert {"channels:join", "im:write", "chat:write", "app_mentions:read"} <= manifest_scopes
    # The Slack app's page and the bot's each list them.
    docs = "\n".join((ROOT / "docs" / page).read_text() for page in ("slack-app.md", "bot.md"))
    readme = _readme_scopes(docs)
    assert len(readme) == 2 and all(found == manifest_scopes for found in readme), readme

    # And what an OAuth install actually asks Slack for.
    emulator = OAuthSlackEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rate_scale=1000.0)
    emulator.add_team(slack_workspace, token="xoxb-unused", bot_user_id=BOT_USER_ID)
    with emulator:
        config = oauth_config()
        bot = await bot_harness(config, emulator=emulator)
        install = await bot.http.get("/slack/install")
        url = re.search(r"https://slack\.com/oauth/v2/authorize\?[^\"'\s]+", install.text).group(0)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url.replace("&amp;", "&")).query)
        assert set(query["scope"][0].split(",")) == manifest_scopes


async def test_public_endpoints_leave_bounded_state_and_claims_are_swept_off_the_mention_path(
    bot_harness, bot_kube, slack_workspace
):
    kmock, url = bot_kube
    emulator = OAuthSlackEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rate_scale=1000.0)
    team = emulator.add_team(slack_workspace, token="xoxb-unused", bot_user_id=BOT_USER_ID)
    with emulator:
        config = oauth_config(sweep_interval_s=0.5)
        bot = await bot_harness(config, emulator=emulator)
        kube = kube_for(url)
        await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Training"))

        def objects() -> int:
            return sum(1 for key in list(kmock.objects) if not kmock.objects[key].deleted)

        before = objects()
        states = []
        for start in range(0, 1000, 50):
            pages = await asyncio.gather(*(bot.http.get("/slack/install") for _ in range(50)))
            assert {p.status_code for p in pages} == {200}, start
            states += [re.search(r"state=([0-9a-f]+)", p.text).group(1) for p in pages]
        assert len(set(states)) == 1000
        assert objects() == before  # 1,000 installs started, nothing stored

        # One of them is finished: the installation is stored and the bot answers that workspace.
        state = states[-1]
        done = await bot.http.get(
            "/slack/oauth_redirect",
            params={"code": emulator.grant(TEAM_ID), "state": state},
            headers={"Cookie": f"slack-app-oauth-state={state}"},
        )
        assert done.status_code == 200, done.text
        text = f"<@{BOT_USER_ID}> hi"
        await bot.event(mention_payload(text, say(emulator, "U02BOB", text), event_id="EvAfterFlood"))
        assert "still training" in (await bot.wait_posts(CHANNEL, 1, team=team))[0]["text"]

        # Claims past their expiry (another replica wrote them with a short TTL) go in the background,
        # listed by label, and so do the one-ConfigMap-per-event claims an earlier version left; a
        # ConfigMap of someone else's in the namespace is left alone.
        assert await KubeEventLedger(kube, BOT_NAMESPACE, -1).claim(TEAM_ID, "EvOld")
        ledger = ledger_configmap(event_key(TEAM_ID, "EvOld"))
        legacy = f"doppel-event-{event_key(TEAM_ID, 'EvLegacy')}"
        for name, labels in ((legacy, {LABEL_EVENT: "seen"}), ("someone-elses", {})):
            meta = {"name": name, "labels": labels, "annotations": {"doppel.dev/expires-at": "0"}}
            await asyncio.to_thread(kube.core.create_namespaced_config_map, BOT_NAMESPACE, {"metadata": meta})

        def names() -> set[str]:
            keys = [key for key in list(kmock.objects) if key[1] == BOT_NAMESPACE]
            return {key[2] for key in keys if not kmock.objects[key].deleted}

        def swept() -> bool:
            data = kmock.objects["v1/configmaps", BOT_NAMESPACE, ledger].get("data") or {}
            return event_key(TEAM_ID, "EvOld") not in data and legacy not in names()

        for _ in range(100):
            if swept():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the expired claims were never swept")
        assert "someone-elses" in names()

        lists = [r for r in kmock if r.resource is not None and r.resource.plural == "configmaps"]
        lists = [r for r in lists if r.action == type(r.action).LIST]
        # (and the held mentions of a cold model pool, by their own label)
        selectors = {f"{LABEL_EVENT}=ledger", f"{LABEL_EVENT}=seen", f"{LABEL_HELD}=true"}
        assert lists and all(r.params.get("labelSelector") in selectors for r in lists)


async def test_doppels_from_slack_are_scheduled_like_ones_applied_with_kubectl(
    bot_harness, bot_kube, tmp_path
):
    bot = await bot_harness(bot_config(require_consent=False))
    assert "Training a doppel of bob" in (await bot.form(command_form("train @bob", user="U02BOB"))).text
    from_slack = await kube_for(bot_kube[1]).get_doppel(NAMESPACE, TEAM_ID, name_of("bob"))
    assert not {"resources", "nodeSelector", "tolerations"} & from_slack["spec"].keys()  # left to defaults
    applied = yaml.safe_load((ROOT / "charts/doppel/examples/doppeluser.yaml").read_text())
    own = {**applied["spec"], "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}]}

    # The operator as the chart configures it (its rendered Deployment's environment).
    deployment = find_manifest(render_chart(), "Deployment", "operator")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = OperatorConfig(train_defaults=TrainDefaults.model_validate_json(env["DOPPEL_TRAIN_DEFAULTS"]))
    owner = Owner(NAMESPACE, "x", "uid-1", 1)

    def scheduling(spec: dict[str, Any]) -> tuple[Any, ...]:
        job = job_manifest(
            owner, "train", 1, ["doppel", "train"], DoppelUserSpec.model_validate(spec), config
        )
        pod = job["spec"]["template"]["spec"]
        return pod.get("tolerations"), pod.get("nodeSelector"), pod["containers"][0].get("resources")

    gpu_taint = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (
        scheduling(from_slack["spec"])
        == scheduling(applied["spec"])
        == (
            gpu_taint,
            None,
            # The chart's training defaults: Burstable, memory limited to its request, one GPU.
            {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"}},
        )
    )
    assert scheduling(own)[0] == own["tolerations"]  # an object's own choice wins

    # A wrong cluster default is refused when the operator starts, with one line.
    bad = CliRunner().invoke(
        main, ["operator", "--train-defaults", '{"tolerations": [{"operator": "Maybe"}]}']
    )
    assert bad.exit_code == 2 and "--train-defaults: tolerations.0.operator" in bad.output


async def long_thread(bot_kube, slack_emulator, replies: int) -> tuple[str, str, str]:
    """alice's doppel, and a thread of `replies` replies then a mention of it: (root, mention ts, text)."""
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    root = say(slack_emulator, "U02BOB", "release plan for the quarter")
    for i in range(1, replies + 1):
        say(slack_emulator, "U03CAROL" if i % 2 else "U02BOB", f"reply number {i}", thread_ts=root)
    text = f"<@{BOT_USER_ID}> what do you think?"
    return root, say(slack_emulator, "U02BOB", text, thread_ts=root), text


async def test_a_long_thread_is_answered_from_its_root_and_latest_messages(
    bot_harness, bot_kube, slack_emulator
):
    """A thread longer than a page of conversations.replies (200): the bot pages up to the mention, and the
    prompt holds the root and the replies just before the mention, not the thread's oldest."""
    asked, chat = recording_chat("ship it")
    bot = await bot_harness(chat=chat)
    root, ts, text = await long_thread(bot_kube, slack_emulator, 250)
    say(slack_emulator, "U03CAROL", "written after the mention", thread_ts=root)
    await bot.event(mention_payload(text, ts, event_id="EvLong", thread_ts=root))
    await bot.wait_posts(CHANNEL, 1)
    prompt = "\n".join(m["content"] for m in asked[0][1][1:])
    assert "release plan for the quarter" in prompt
    assert "reply number 250" in prompt and "reply number 249" in prompt
    assert "reply number 1\n" not in prompt and "reply number 50\n" not in prompt
    assert "written after the mention" not in prompt
    assert prompt.endswith("what do you think?")
    pages = [c for c in slack_emulator.calls_to("conversations.replies") if c.params.get("ts") == root]
    assert len(pages) == 2 and all(p.params.get("latest") == ts for p in pages)


async def test_a_long_thread_is_answered_at_once_under_the_non_marketplace_limit(
    bot_harness, bot_kube, slack_emulator
):
    """A distributed app outside the Marketplace reads one page of 15 thread messages a minute: a thread of
    40 replies is answered at once from its root, its first page and the mention, not after minutes of
    waiting (or an apology once the mention's deadline has passed)."""
    slack_emulator.rate_profile = "non-marketplace"
    asked, chat = recording_chat("ship it")
    bot = await bot_harness(chat=chat)
    root, ts, text = await long_thread(bot_kube, slack_emulator, 40)
    started = time.monotonic()
    await bot.event(mention_payload(text, ts, event_id="EvSlowPages", thread_ts=root))
    posts = await bot.wait_posts(CHANNEL, 1, timeout=30)
    assert posts[0]["text"] == "ship it" and time.monotonic() - started < 30
    prompt = "\n".join(m["content"] for m in asked[0][1][1:])
    assert "release plan for the quarter" in prompt and "reply number 1\n" in prompt
    assert prompt.endswith("what do you think?")
    pages = [c for c in slack_emulator.calls_to("conversations.replies") if c.params.get("ts") == root]
    assert [p.status for p in pages][:1] == [200] and any(p.status == 429 for p in pages)


@pytest.mark.parametrize(
    "question",
    [
        "is this still the plan?\n&gt; the staging database moves to Postgres 16 on Friday",
        "\n&gt; the staging database moves to Postgres 16 on Friday\nis this still the plan?",
    ],
    ids=["quote-after-the-question", "quote-first"],
)
async def test_a_long_threads_message_quoted_by_the_mention_reaches_the_model(
    bot_harness, bot_kube, slack_emulator, question
):
    """A thread far longer than the prompt's budget whose mention quotes (`> …`) one of its first replies:
    that reply is pinned into the prompt whole, however far back, with the root and the latest replies."""
    asked, chat = recording_chat("still friday")
    bot = await bot_harness(chat=chat)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    root = say(slack_emulator, "U02BOB", "release plan for the quarter")
    say(
        slack_emulator,
        "U03CAROL",
        "the staging database moves to Postgres 16 on Friday; the old replica is retired a week later",
        thread_ts=root,
    )
    for i in range(2, 251):
        say(
            slack_emulator,
            "U03CAROL" if i % 2 else "U04DAVE",
            f"reply number {i}, on another topic",
            thread_ts=root,
        )
    text = f"<@{BOT_USER_ID}> {question}"
    ts = say(slack_emulator, "U02BOB", text, thread_ts=root)
    await bot.event(mention_payload(text, ts, event_id="EvQuote", thread_ts=root))
    assert (await bot.wait_posts(CHANNEL, 1))[0]["text"] == "still friday"
    prompt = "\n".join(m["content"] for m in asked[0][1][1:])
    assert "the old replica is retired a week later" in prompt  # the quoted reply, not just the quote
    assert "release plan for the quarter" in prompt and "reply number 250, on another topic" in prompt
    assert "reply number 2, on another topic" not in prompt  # the rest of the thread's start is not
    assert len(prompt) <= DEFAULT_BUDGET_CHARS  # within the budget all the same


async def test_a_question_starting_with_as_goes_to_the_active_doppel(bot_harness, bot_kube, slack_emulator):
    """ "as discussed yesterday" names no doppel: the active one answers the whole question. `as <handle>`
    of an existing doppel, and `as <@U…>`, still pick one."""
    asked, chat = recording_chat("friday")
    bot = await bot_harness(chat=chat)
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", served_name="a-v1"))
    await kube.create_doppel(NAMESPACE, doppel_body("carol", "U03CAROL", served_name="c-v1"))
    await kube.set_state(NAMESPACE, TEAM_ID, {"active": name_of("alice")})
    cases = [
        ("as discussed yesterday, when do we ship?", "a-v1", "as discussed yesterday, when do we ship?"),
        ("As a PM, what would you cut?", "a-v1", "As a PM, what would you cut?"),
        ("as carol: when do we ship?", "c-v1", "when do we ship?"),
        ("as <@U03CAROL|carol> when do we ship?", "c-v1", "when do we ship?"),
    ]
    for i, (question, model, read) in enumerate(cases):
        text = f"<@{BOT_USER_ID}> {question}"
        ts = say(slack_emulator, "U02BOB", text)
        await bot.event(mention_payload(text, ts, event_id=f"EvAs{i}"))
        posts = await bot.wait_posts(CHANNEL, i + 1)
        assert posts[i]["text"] == "friday" and posts[i]["thread_ts"] == ts
        assert asked[i][0] == model and asked[i][1][-1]["content"].endswith(read), (question, asked[i])


async def test_a_mention_whose_admission_fails_gets_an_apology(bot_harness, bot_kube, slack_emulator):
    """Kubernetes failing while a mention of an Enterprise Grid workspace is admitted (its doppels adopted
    by the org): the author is told, privately, rather than the claimed mention being left in silence."""
    kmock, _ = bot_kube
    _, chat = recording_chat("hi")
    bot = await bot_harness(chat=chat)
    kmock[kmock_lib.action.LIST, kmock_lib.resource("doppel.dev", "v1alpha1", "doppelusers")] << 503
    text = f"<@{BOT_USER_ID}> are we shipping?"
    ts = say(slack_emulator, "U02BOB", text)
    payload = mention_payload(text, ts, event_id="EvAdmit")
    payload["enterprise_id"] = payload["authorizations"][0]["enterprise_id"] = "E0ACMEGRID"
    await bot.event(payload)
    for _ in range(200):
        if slack_emulator.ephemeral_posts(CHANNEL):
            break
        await asyncio.sleep(0.05)
    [apology] = slack_emulator.ephemeral_posts(CHANNEL)
    assert apology["user"] == "U02BOB" and apology["thread_ts"] == ts
    assert "Sorry, I couldn't answer this one" in apology["text"]
    await settle()
    assert slack_emulator.posted(CHANNEL) == []
