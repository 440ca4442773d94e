"""Memory, sources, abstention and the person's feedback, through the real bot and the Slack emulator.

The doppel's adapter directory holds a memory index of Alice's messages (as `doppel train` writes it); the
model is the real tiny model with a trained adapter, in process. Clicks and the correction modal are sent
as Slack sends them: `block_actions` and `view_submission` payloads, form-encoded and signed, with trigger
ids the emulator issued (views.open refuses any other)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any

import pytest
from tests.support.bot_fixtures import (
    CHANNEL,
    NAMESPACE,
    TEAM_ID,
    bot_config,
    command_form,
    doppel_body,
    kube_for,
    mention_payload,
    name_of,
    say,
)
from tests.support.model_fixtures import POSTGRES_PATTERN
from tests.support.slack_fixtures import BOT_USER_ID

from doppel.bot.chat import backend_chat
from doppel.memory.feedback import CORRECTION_WEIGHT, FeedbackStore
from doppel.memory.index import entries_from_samples, write_index
from doppel.serve.backend import DEFAULT_PARAMS
from doppel.serve.local import LocalBackend
from doppel.slack.conversation import system_prompt

ALICE = "U01ALICE"
T0 = 1_741_780_800.0  # 12 Mar 2025


def alice_said(text: str, answered: str, ts: float, channel: str = "engineering") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": system_prompt("Alice Martin")},
            {"role": "user", "content": answered},
            {"role": "assistant", "content": text},
        ],
        "meta": {
            "team": TEAM_ID,
            "channel": channel,
            "channel_id": "C02ENG",
            "thread_ts": f"{ts:.6f}",
            "ts": f"{ts:.6f}",
            "user": ALICE,
            "person": "Alice Martin",
        },
    }


HISTORY = [
    alice_said(
        "Billing runs on Postgres 16; the invoices table is partitioned by month.",
        "Bob Chen: which database does billing use?",
        T0,
    ),
    alice_said(
        "Deploys go out nightly at 2am through the Jenkins pipeline.", "Carol Diaz: deploys?", T0 + 600
    ),
    *[alice_said(f"Coffee {i}: flat white, no sugar.", "Dave Kim: coffee?", T0 + 900 + i) for i in range(12)],
]


@pytest.fixture
def alice_memory(tmp_path):
    """Alice's memory index, as the train stage writes it beside her adapter."""
    memory = tmp_path / "memory-of-alice"
    write_index(
        entries_from_samples(HISTORY), memory, team=TEAM_ID, person_id=ALICE, person_name="Alice Martin"
    )
    return memory


@pytest.fixture
async def alice_bot(bot_harness, bot_kube, tmp_path, tiny_model, train_style_adapter, alice_memory):
    served = "alice-v1"
    trained_adapter = train_style_adapter("postgres", POSTGRES_PATTERN)  # her replies say "Postgres 16"
    backend = LocalBackend(tiny_model, {served: trained_adapter})
    real = backend_chat(backend, DEFAULT_PARAMS.override(max_tokens=12))
    prompts: list[list[dict[str, str]]] = []

    async def chat(model: str, messages: list[dict[str, str]]) -> str:
        prompts.append(messages)  # what the model was asked: the real model still answers
        return await real(model, messages)

    # The memory sits beside the adapter, as `doppel train` writes it (the adapter is a link here).
    adapter_dir = tmp_path / "adapter-with-memory"
    adapter_dir.mkdir()
    for item in trained_adapter.iterdir():
        (adapter_dir / item.name).symlink_to(item)
    (adapter_dir / "memory").symlink_to(alice_memory, target_is_directory=True)
    body = doppel_body("alice", ALICE, served_name=served)
    body["status"]["adapter"]["path"] = str(adapter_dir)
    await kube_for(bot_kube[1]).create_doppel(NAMESPACE, body)
    bot = await bot_harness(bot_config(data_root=str(tmp_path / "data")), chat=chat)
    return bot, prompts, FeedbackStore(tmp_path / "data" / NAMESPACE / name_of("alice"))


async def ask(bot, emulator, text: str, event_id: str, count: int) -> dict[str, Any]:
    ts = say(emulator, "U02BOB", f"<@{BOT_USER_ID}> {text}")
    assert (
        await bot.event(mention_payload(f"<@{BOT_USER_ID}> {text}", ts, event_id=event_id))
    ).status_code == 200
    return (await bot.wait_posts(CHANNEL, count, timeout=120))[-1]


async def until(condition, timeout: float = 10.0) -> None:
    """Wait for what the bot does after posting (it keeps the reply's context once the post is out)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def interaction(payload: dict[str, Any]) -> str:
    return urllib.parse.urlencode({"payload": json.dumps(payload)})


def block_actions(emulator, post: dict[str, Any], user: str, action: dict[str, Any]) -> str:
    """A click on `post`'s block element, shaped as Slack sends it."""
    return interaction(
        {
            "type": "block_actions",
            "user": {"id": user, "username": user.lower(), "team_id": TEAM_ID},
            "api_app_id": "A0DOPPEL",
            "token": "legacy",
            "container": {
                "type": "message",
                "message_ts": post["ts"],
                "channel_id": CHANNEL,
                "is_ephemeral": False,
                "thread_ts": post.get("thread_ts"),
            },
            "trigger_id": emulator.issue_trigger(user),
            "team": {"id": TEAM_ID, "domain": "acme"},
            "channel": {"id": CHANNEL, "name": "general"},
            "message": post,
            "response_url": "http://127.0.0.1:9/unused",
            "actions": [{**action, "action_ts": str(time.time())}],
        }
    )


def element(post: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(e for b in post["blocks"] for e in b.get("elements", []) if e.get("type") == kind)


async def test_a_question_answered_from_memory_shows_its_source(alice_bot, slack_emulator):
    bot, prompts, _ = alice_bot
    post = await ask(bot, slack_emulator, "as alice which database is billing on?", "EvMem1", 1)
    assert "Postgres 16" in prompts[0][0]["content"]  # her own message went into the prompt
    context = next(b for b in post["blocks"] if b["type"] == "context")
    link = f"https://acme.slack.com/archives/C02ENG/p{f'{T0:.6f}'.replace('.', '')}"
    assert context["elements"][0]["text"] == f"from <{link}|#engineering, 12 Mar 2025>"
    assert post["blocks"][0]["text"]["text"] == post["text"]


async def test_a_reply_that_ignores_what_memory_found_shows_no_source(alice_bot, slack_emulator):
    bot, prompts, store = alice_bot
    post = await ask(bot, slack_emulator, "as alice when do deploys go out?", "EvMem4", 1)
    assert "Jenkins" in prompts[0][0]["content"]  # memory found her deploy message...
    assert "Postgres" in post["text"]  # ...and the reply says something else: nothing backs it
    assert not any(b["type"] == "context" for b in post["blocks"])
    assert any(b["type"] == "context_actions" for b in post["blocks"])  # feedback still asked for
    await until(lambda: store.counts().replies == 1)
    assert store.reply(post["ts"])["sources"] == []


async def test_a_question_with_no_basis_gets_an_abstention_naming_the_person(alice_bot, slack_emulator):
    bot, prompts, store = alice_bot
    post = await ask(bot, slack_emulator, "as alice what is our GDPR retention policy?", "EvMem2", 1)
    assert prompts == []  # nothing to go on: the model is not asked to guess
    assert "ask Alice Martin directly" in post["text"] and "<@" not in post["text"]
    assert not any(b["type"] == "context" for b in post["blocks"])  # no sources to show
    await until(lambda: store.counts().replies == 1)
    assert store.reply(post["ts"])["abstained"] is True


async def test_feedback_and_the_correction_modal_reach_the_next_training(alice_bot, slack_emulator):
    bot, prompts, store = alice_bot
    post = await ask(bot, slack_emulator, "as alice when do deploys go out?", "EvMem3", 1)
    await until(lambda: store.counts().replies == 1)
    feedback = element(post, "feedback_buttons")
    down = {
        "type": "feedback_buttons",
        "action_id": feedback["action_id"],
        "block_id": "fb",
        "value": feedback["negative_button"]["value"],
    }
    assert (await bot.form(block_actions(slack_emulator, post, "U02BOB", down))).status_code == 200
    await until(lambda: store.counts().down == 1)
    status = await bot.form(command_form("status @alice", user="U02BOB"))
    assert "0 👍, 1 👎, 0 corrections on 1 replies" in status.text

    correct = element(post, "button")
    click = {"type": "button", "action_id": correct["action_id"], "block_id": "c", "value": correct["value"]}
    # Bob is not Alice: told so, privately; no modal.
    assert (await bot.form(block_actions(slack_emulator, post, "U02BOB", click))).status_code == 200
    await asyncio.sleep(0.5)
    assert slack_emulator.opened_views() == []
    refusal = slack_emulator.ephemeral_posts(CHANNEL)[-1]
    assert refusal["user"] == "U02BOB" and "Only alice can correct" in refusal["text"]

    # Alice: the modal opens with her doppel's reply in it.
    assert (await bot.form(block_actions(slack_emulator, post, ALICE, click))).status_code == 200
    await until(slack_emulator.opened_views)
    [view] = slack_emulator.opened_views()
    field = view["blocks"][0]
    assert view["user"] == ALICE and field["element"]["initial_value"] == store.reply(post["ts"])["reply"]

    submission = {
        "type": "view_submission",
        "team": {"id": TEAM_ID, "domain": "acme"},
        "user": {"id": ALICE, "username": "alice", "team_id": TEAM_ID},
        "api_app_id": "A0DOPPEL",
        "token": "legacy",
        "trigger_id": slack_emulator.issue_trigger(ALICE),
        "view": {
            **{k: view[k] for k in ("id", "type", "callback_id", "private_metadata", "title", "blocks")},
            "team_id": TEAM_ID,
            "state": {
                "values": {
                    field["block_id"]: {
                        field["element"]["action_id"]: {
                            "type": "plain_text_input",
                            "value": "2am, every night",
                        }
                    }
                }
            },
        },
    }
    answered = await bot.form(interaction(submission))
    assert answered.status_code == 200 and answered.text in ("", "{}")  # the modal closes
    status = await bot.form(command_form("status @alice", user="U02BOB"))
    assert "1 👎, 1 correction on 1 replies" in status.text

    # What the next training reads: the prompt the doppel answered, ending with Alice's own words.
    [sample] = store.training_samples(person="Alice Martin")
    assert sample["messages"] == [*prompts[0], {"role": "assistant", "content": "2am, every night"}]
    assert sample["meta"]["weight"] == CORRECTION_WEIGHT
    [pair] = store.preference_pairs()
    assert pair["rejected"][0]["content"] == store.reply(post["ts"])["reply"]


async def test_an_empty_correction_is_refused_in_the_modal(alice_bot, slack_emulator):
    bot, _, store = alice_bot
    metadata = json.dumps({"doppel": name_of("alice"), "reply_ts": "1.000001"})
    submission = {
        "type": "view_submission",
        "team": {"id": TEAM_ID, "domain": "acme"},
        "user": {"id": ALICE, "username": "alice", "team_id": TEAM_ID},
        "api_app_id": "A0DOPPEL",
        "view": {
            "id": "V1",
            "type": "modal",
            "callback_id": "doppel_correction",
            "private_metadata": metadata,
            "state": {"values": {"correction": {"text": {"type": "plain_text_input", "value": "  "}}}},
        },
    }
    answered = await bot.form(interaction(submission))
    assert json.loads(answered.text)["response_action"] == "errors"
    assert store.counts().corrections == 0
