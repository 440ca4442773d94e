"""`doppel local --socket-mode`: the bot it starts answers mentions with the local adapter, in-process.

Socket Mode itself needs Slack's websocket service, which no test here can reach; the bot that
`--socket-mode` builds (`local_bot`) is the same Bolt app whatever the transport, so it is driven here
over signed HTTP events against the Slack emulator.
"""

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from tests.support.bot_fixtures import (
    CHANNEL,
    SIGNING_SECRET,
    BotHarness,
    command_form,
    mention_payload,
    say,
)
from tests.support.model_fixtures import STYLE_PATTERN, STYLE_PERSON, STYLE_PERSON_ID
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID

from doppel.cli import main
from doppel.local import LOCAL_NAMESPACE, Outcome, local_bot, socket_mode_config
from doppel.local.serving import Decision


def env(**values: str) -> dict[str, str]:
    return {"SLACK_SIGNING_SECRET": SIGNING_SECRET, **values}


def pat_outcome(tiny_model, trained_adapter, **changes) -> Outcome:
    """What `doppel local` produced for the style person "pat" on the tiny model."""
    values = {
        "person_id": STYLE_PERSON_ID,
        "person_name": STYLE_PERSON,
        "handle": "pat",
        "samples": 40,
        "added_samples": 0,
        "base_model": tiny_model,
        "adapter": trained_adapter,
        "trained": False,
        "metrics": {},
    }
    return Outcome(**{**values, **changes})


async def test_local_bot_answers_a_mention_with_the_adapter(slack_emulator, tiny_model, trained_adapter):
    config = socket_mode_config(ACME_TOKEN, env(SLACK_APP_TOKEN="xapp-1-local", DOPPEL_MAX_TOKENS="24"))
    outcome = pat_outcome(tiny_model, trained_adapter)
    bot = local_bot(outcome, replace(config, slack_api_url=slack_emulator.base_url))
    harness = await BotHarness(bot, slack_emulator).start()
    try:
        text = f"<@{BOT_USER_ID}> how did the deploy go?"
        ts = say(slack_emulator, "U02BOB", text)
        response = await harness.event(mention_payload(text, ts, event_id="EvLocal1"))
        assert response.status_code == 200
        posts = await harness.wait_posts(CHANNEL, 1, timeout=120)
    finally:
        await harness.stop()
    assert {p["username"] for p in posts} == {"pat-bot"}
    assert all(p["thread_ts"] == ts for p in posts)
    # The adapter's trained style ("Yarr! ... matey ☠"), which the bare base model never produces: its
    # opening and its closing (at 24 tokens the tiny adapter sometimes leaves out the middle).
    said = " ".join(p["text"] for p in posts).lower()
    assert STYLE_PATTERN.split()[0].lower() in said and STYLE_PATTERN[-1] in said, said


async def test_slash_commands_say_the_fidelity_gate_kept_the_old_adapter(
    slack_emulator, tiny_model, trained_adapter, tmp_path
):
    """`doppel local` kept serving the old adapter: `/doppel list` (and status) in Slack say so, with the
    figures."""
    config = socket_mode_config(ACME_TOKEN, env(SLACK_APP_TOKEN="xapp-1-local"))
    refused = Decision(tmp_path / "candidate", trained_adapter, ["likeness 0.41 < 0.62 serving"])
    report = {"likeness": {"adapter": 0.62, "prompted_base": 0.1, "real": 0.7}}
    outcome = pat_outcome(tiny_model, trained_adapter, trained=True, fidelity=report, gate=refused)
    bot = local_bot(outcome, replace(config, slack_api_url=slack_emulator.base_url))
    harness = await BotHarness(bot, slack_emulator).start()
    try:
        listed = await harness.form(command_form("list", user="U02BOB"))
    finally:
        await harness.stop()
    assert "*pat*: Ready, 40 samples, likeness 0.62 (persona prompt 0.10, real replies 0.70)" in listed.text
    assert "NOT PROMOTED" in listed.text and "likeness 0.41 < 0.62 serving" in listed.text


def test_socket_mode_config_defaults_the_bot_token_and_maps_every_team_to_one_place():
    config = socket_mode_config("xoxb-from-flag", env(SLACK_APP_TOKEN="xapp-1"))
    assert config.bot_token == "xoxb-from-flag"
    assert config.namespace_for("T0ANY") == config.namespace_for("T0OTHER") == LOCAL_NAMESPACE
    from_env = socket_mode_config("xoxb-flag", env(SLACK_APP_TOKEN="x", SLACK_BOT_TOKEN="xoxb-env"))
    assert from_env.bot_token == "xoxb-env"


@pytest.mark.parametrize(
    ("variables", "reason"),
    [
        ({"SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_BOT_TOKEN": "xoxb-1"}, "needs SLACK_APP_TOKEN"),
        ({"SLACK_APP_TOKEN": "xapp-1", "SLACK_BOT_TOKEN": "xoxb-1"}, "SLACK_SIGNING_SECRET is not set"),
        ({"SLACK_APP_TOKEN": "xapp-1", "SLACK_SIGNING_SECRET": SIGNING_SECRET}, "set SLACK_BOT_TOKEN"),
    ],
)
def test_socket_mode_without_its_settings_fails_before_any_work(tmp_path, monkeypatch, variables, reason):
    for name in ("SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_BOT_TOKEN", "SLACK_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "data"
    result_file = tmp_path / "result.json"
    result = CliRunner(env={"DOPPEL_RESULT_FILE": str(result_file)}).invoke(
        main, ["local", "--demo", "--socket-mode", "--workdir", str(workdir)]
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doppel: error: ") and reason in lines[0], lines
    assert json.loads(result_file.read_text())["kind"] == "bad_input"
    assert not workdir.exists()
