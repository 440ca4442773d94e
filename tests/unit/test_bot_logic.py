"""The bot's pure logic and configuration: commands, mentions, reply splitting, wording, env parsing."""

from __future__ import annotations

import logging
import re

import pytest
from click.testing import CliRunner

from doppel.bot import logic
from doppel.bot.config import BotConfig
from doppel.bot.directory import MemoryDirectory
from doppel.bot.ledger import MemoryEventLedger, SqlEventLedger
from doppel.bot.redact import install_token_redaction, redact
from doppel.bot.safety import WORD_JOINER, neutralize, user_ids
from doppel.bot.snapshot import Snapshots
from doppel.cli import main


@pytest.mark.parametrize(
    ("text", "verb", "user"),
    [
        ("", "help", None),
        ("help", "help", None),
        ("LIST", "list", None),
        ("train <@U02BOB|bob>", "train", logic.UserRef("U02BOB", "bob")),
        ("train <@U02BOB>", "train", logic.UserRef("U02BOB", None)),
        ("switch @sam.lee", "switch", logic.UserRef(None, "sam.lee")),
        ("status", "status", None),
        ("status alice", "status", logic.UserRef(None, "alice")),
        ("forget  @alice ", "forget", logic.UserRef(None, "alice")),
    ],
)
def test_parse_command(text, verb, user):
    assert logic.parse_command(text) == logic.Command(verb, user)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fly", "unknown command `fly`"),
        ("train", "needs a user"),
        ("forget", "needs a user"),
        ("train alice bob", "takes one user, got 2 words"),
        ("help me", "takes no argument"),
        ("train <#C123|general>", "is not a Slack user"),
        ("switch !!", "is not a Slack user"),
    ],
)
def test_bad_commands_say_what_is_wrong(text, message):
    with pytest.raises(logic.CommandError, match=message):
        logic.parse_command(text)


def test_mention_selector_and_bot_mention():
    text = logic.strip_bot_mention("<@U0DOPPEL> as <@U01ALICE|alice>, when is the deploy?", "U0DOPPEL")
    ref, rest = logic.pick_doppel(text, [])
    assert ref == logic.UserRef("U01ALICE", "alice") and rest == "when is the deploy?"
    doppels = [_doppel("bob", "U2")]
    assert logic.pick_doppel("As bob: hi", doppels) == (logic.UserRef(None, "bob"), "hi")
    assert logic.pick_doppel("ask bob about it", doppels) == (None, "ask bob about it")
    # "as" before a word that is no doppel's handle is English, not a selector.
    assert logic.pick_doppel("as discussed, ship?", doppels) == (None, "as discussed, ship?")
    assert logic.pick_doppel("As bob: hi", []) == (None, "As bob: hi")
    assert logic.strip_bot_mention("<@U0OTHER> hi", "U0DOPPEL") == "<@U0OTHER> hi"


def test_split_reply_on_blank_lines_and_separator_with_a_cap():
    assert logic.split_reply("one\n\ntwo<|msg|>three\nstill three") == ["one", "two", "three\nstill three"]
    assert logic.split_reply("  \n\n ") == []
    assert len(logic.split_reply("\n\n".join(str(i) for i in range(20)))) == logic.MAX_REPLY_MESSAGES


def test_object_names_and_event_keys():
    assert logic.object_name("Sam.Lee") == "sam-lee"
    with pytest.raises(logic.CommandError):
        logic.object_name("...")
    assert logic.event_key("T1", "Ev1") != logic.event_key("T2", "Ev1")
    assert len(logic.event_key("T1", "Ev1")) == 40


def test_describe_and_not_ready_replies():
    training = {"step": 40, "totalSteps": 100}
    doppel = {
        "metadata": {"name": "alice"},
        "status": {"phase": "Training", "training": training, "samples": 812},
    }
    assert logic.describe(doppel) == "*alice*: Training (40% of 100 steps), 812 samples"
    assert logic.not_ready_reply(doppel) == (
        "alice's doppel is still training (Training, 40% of 100 steps). Ask again when it is Ready."
    )
    scraping = {"metadata": {"name": "bob"}, "status": {"phase": "Scraping"}}
    assert logic.describe(scraping) == "*bob*: Scraping"
    assert logic.describe({"metadata": {"name": "c"}}) == "*c*: Pending"
    assert logic.served_name(doppel) is None
    ready = {"metadata": {"name": "a"}, "status": {"phase": "Ready", "adapter": {"servedName": "ns-a-v2"}}}
    assert logic.served_name(ready) == "ns-a-v2"
    failed = {"metadata": {"name": "a"}, "status": {"phase": "Failed", "reason": "too few samples"}}
    assert "failed to train" in logic.not_ready_reply(failed) and "too few samples" in logic.describe(failed)
    assert logic.progress_note({"metadata": {"name": "a"}, "status": {"phase": "Scraping"}}) is None


ENV = {"SLACK_SIGNING_SECRET": "s", "SLACK_BOT_TOKEN": "xoxb-1"}


def test_config_from_env():
    config = BotConfig.from_env(
        {
            **ENV,
            "DOPPEL_TEAM_NAMESPACES": "T1=acme, T2=beta",
            "DOPPEL_REQUIRE_CONSENT": "false",
            "DOPPEL_MAX_DOPPELS": "3",
            "SLACK_API_URL": "http://127.0.0.1:9/api",
        }
    )
    assert config.namespace_for("T1") == "acme" and config.namespace_for("T9ZZ") == "doppel-t9zz"
    assert not config.require_consent and config.max_doppels_per_workspace == 3
    assert config.slack_api_url == "http://127.0.0.1:9/api/" and not config.oauth
    oauth = BotConfig.from_env(
        {"SLACK_SIGNING_SECRET": "s", "SLACK_CLIENT_ID": "1", "SLACK_CLIENT_SECRET": "2"}
    )
    assert oauth.oauth
    # What `/doppel train` writes: internal app with one token, non-Marketplace through OAuth, or as told.
    assert config.new_doppel_rate_profile() is None
    assert oauth.new_doppel_rate_profile() == "non-marketplace"
    listed = BotConfig.from_env({**ENV, "DOPPEL_RATE_PROFILE": "marketplace"})
    assert listed.new_doppel_rate_profile() == "marketplace"
    # The membership policy and the install allowlist: closed unless the chart opens them.
    assert not (config.allow_guests or config.allow_shared_channels) and config.phone_regions == ()
    assert not oauth.may_install("T0ACME001", None)
    policy = BotConfig.from_env(
        {
            **ENV,
            "DOPPEL_ALLOW_GUESTS": "true",
            "DOPPEL_ALLOW_SHARED_CHANNELS": "true",
            "DOPPEL_INSTALL_ALLOWLIST": "T0ACME001, E0GRID001",
            "DOPPEL_PHONE_REGIONS": "gb,DE",
        }
    )
    assert policy.allow_guests and policy.allow_shared_channels and policy.phone_regions == ("GB", "DE")
    assert policy.may_install("T0ACME001", None) and policy.may_install(None, "E0GRID001")
    assert policy.may_install("T0OTHER01", "E0GRID001") and not policy.may_install("T0OTHER01", None)
    anyone = BotConfig.from_env({**ENV, "DOPPEL_INSTALL_ALLOWLIST": "any"})
    assert anyone.may_install("T0OTHER01", None)
    # Replies open at temperature 1.0 unless told otherwise; 0 generates them at one temperature throughout.
    assert config.generation().samples_opening and config.generation().max_tokens == config.max_tokens
    assert not BotConfig.from_env({**ENV, "DOPPEL_OPENING_TEMPERATURE": "0"}).generation().samples_opening


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLACK_BOT_TOKEN": "xoxb-1"}, "SLACK_SIGNING_SECRET is not set"),
        ({"SLACK_SIGNING_SECRET": "s"}, "set SLACK_BOT_TOKEN"),
        ({**ENV, "SLACK_CLIENT_ID": "1"}, "not both"),
        ({**ENV, "DOPPEL_TEAM_NAMESPACES": "T1"}, "TEAM=namespace"),
        ({**ENV, "DOPPEL_TEAM_NAMESPACES": "T1=Not_A_Namespace"}, "TEAM=namespace"),
        ({**ENV, "DOPPEL_NAMESPACE_TEMPLATE": "doppel"}, "containing {team}"),
        ({**ENV, "DOPPEL_REQUIRE_CONSENT": "maybe"}, "true or false"),
        ({**ENV, "DOPPEL_MAX_DOPPELS": "many"}, "must be a number"),
        ({**ENV, "VLLM_TIMEOUT_S": "-1"}, "must be positive"),
        ({**ENV, "DOPPEL_OPENING_TEMPERATURE": "-0.5"}, "must be 0 or more"),
        ({**ENV, "SLACK_API_URL": "slack.example"}, "http"),
        ({**ENV, "DOPPEL_RATE_PROFILE": "gold"}, "DOPPEL_RATE_PROFILE must be one of"),
        ({**ENV, "DOPPEL_INSTALL_ALLOWLIST": "any,T0ACME001"}, "either 'any' or a list of ids"),
        ({**ENV, "DOPPEL_INSTALL_ALLOWLIST": "acme"}, "wants Slack team (T…) or org (E…) ids"),
        ({**ENV, "DOPPEL_PHONE_REGIONS": "GB,UK"}, "unknown phone region 'UK'"),
        ({**ENV, "DOPPEL_ALLOW_GUESTS": "sometimes"}, "true or false"),
    ],
)
def test_doppel_bot_refuses_bad_configuration_with_exit_2(env, message, monkeypatch):
    for name in [*ENV, "SLACK_CLIENT_ID", "SLACK_CLIENT_SECRET", "SLACK_APP_TOKEN"]:
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["bot"], env=env)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_socket_mode_needs_an_app_token(monkeypatch):
    monkeypatch.delenv("SLACK_APP_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["bot", "--socket-mode"], env=ENV)
    assert result.exit_code == 2 and "SLACK_APP_TOKEN" in result.stderr


async def test_sql_ledger_is_shared_by_replicas_and_survives_restarts(tmp_path):
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    first, second = SqlEventLedger(url, ttl_s=60), SqlEventLedger(url, ttl_s=60)
    assert await first.claim("T1", "Ev1")
    assert not await second.claim("T1", "Ev1")
    assert await second.claim("T2", "Ev1")  # another workspace's event of the same id
    assert not await SqlEventLedger(url, ttl_s=60).claim("T1", "Ev1")
    expired = SqlEventLedger(f"sqlite:///{tmp_path / 'short.db'}", ttl_s=-1)
    assert await expired.claim("T1", "Ev1") and await expired.claim("T1", "Ev1")
    memory = MemoryEventLedger()
    assert await memory.claim("T1", "Ev1") and not await memory.claim("T1", "Ev1")


def test_tokens_are_redacted_from_every_log_record(caplog):
    install_token_redaction()
    caplog.set_level(logging.DEBUG)
    secret = "xoxb-123-456-abcdefSECRET"
    logging.getLogger("slack_sdk.anything").debug(
        "body: %s", {"access_token": secret, "refresh": "xoxe-1-zz"}
    )
    try:
        raise RuntimeError(f"bad token {secret}")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    assert secret not in caplog.text and "xoxe-1-zz" not in caplog.text
    assert "xoxb-[redacted]" in caplog.text
    assert redact("client_id=1&client_secret=abc&x=1") == "client_id=1&client_secret=[redacted]&x=1"


def _doppel(name, user_id):
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"target": {"userId": user_id}}}


def test_pick_the_named_then_the_active_then_the_only_doppel():
    alice, bob = _doppel("alice", "U1"), _doppel("bob", "U2")
    both = logic.Snapshot([alice, bob], active="bob")
    assert logic.pick(both, logic.UserRef(None, "Alice")) is alice
    assert logic.pick(both, logic.UserRef("U1", "someone-else")) is alice
    assert logic.pick(both, logic.UserRef(None, "carol")) is None
    assert logic.pick(both, None) is bob
    assert logic.pick(logic.Snapshot([alice, bob], active=None), None) is None
    assert logic.pick(logic.Snapshot([alice], active="gone"), None) is alice


async def test_snapshots_are_reread_after_their_ttl_or_an_invalidation():
    directory = MemoryDirectory()
    directory.add(_doppel("alice", "U1"))
    snapshots = Snapshots(directory, ttl_s=60)
    first = await snapshots.get("ns", "T1")
    directory.add(_doppel("bob", "U2"))
    assert await snapshots.get("ns", "T1") is first  # cached
    snapshots.invalidate("ns", "T1")
    assert [d["metadata"]["name"] for d in (await snapshots.get("ns", "T1")).doppels] == ["alice", "bob"]
    await directory.set_state("ns", "T1", {"active": "bob"})
    assert (await Snapshots(directory, ttl_s=0).get("ns", "T1")).active == "bob"
    assert (await Snapshots(directory, ttl_s=0).get("ns", "T2")).active is None  # state is per team


def test_names_carry_the_team_so_two_workspaces_may_each_have_an_alice():
    assert logic.object_name("alice", "T0123ABCD") == "alice-t0123abcd"
    assert logic.object_name("alice", "T0123ABCD") != logic.object_name("alice", "T0456EFGH")
    assert len(logic.object_name("x" * 80, "T0123ABCD")) == 63
    # Handles rewritten or cut alike stay apart given their people; a handle that is a name keeps it.
    rewritten = [
        logic.object_name(handle, "T0123ABCD", user)
        for handle, user in (("alice.b", "U1"), ("alice_b", "U2"), ("alice-b", "U3"), ("x" * 79 + "a", "U4"))
    ]
    rewritten.append(logic.object_name("x" * 79 + "b", "T0123ABCD", "U5"))
    assert len(set(rewritten)) == 5 and rewritten[2] == "alice-b-t0123abcd"
    assert all(len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) for name in rewritten)
    assert logic.object_name("alice.b", "T0123ABCD", "U1") == logic.object_name("alice_b", "T0123ABCD", "U1")
    with pytest.raises(logic.CommandError):
        logic.object_name("alice", "T0/../x")


GRID_USER = {"id": "W1", "team_id": "T2", "enterprise_user": {"enterprise_id": "E1", "teams": ["T2", "T3"]}}


@pytest.mark.parametrize(
    ("user", "tenant", "member"),
    [
        ({"id": "U1", "team_id": "T1"}, logic.Tenant("T1"), True),
        ({"id": "U1", "team_id": "T1", "deleted": True}, logic.Tenant("T1"), False),
        ({"id": "U9", "team_id": "T9"}, logic.Tenant("T1"), False),  # Slack Connect: another company
        ({"id": "U9", "team_id": "T1", "is_stranger": True}, logic.Tenant("T1"), False),
        ({}, logic.Tenant("T1"), False),  # users.info did not know them
        (GRID_USER, logic.Tenant("T3", "E1"), True),  # a Grid user who belongs to this workspace too
        (GRID_USER, logic.Tenant("T4", "E1"), False),  # same org, another workspace: workspace install
        (GRID_USER, logic.Tenant("T4", "E1", org_wide=True), True),  # the org installed it
        (GRID_USER, logic.Tenant("T4", "E2", org_wide=True), False),
    ],
)
def test_who_is_a_member_of_a_tenant(user, tenant, member):
    assert logic.is_member(user, tenant) is member


def test_slack_connect_payloads_name_the_foreign_team():
    envelope = {"is_ext_shared_channel": True, "event": {"user_team": "T9", "source_team": "T9"}}
    assert logic.foreign_teams(envelope, logic.Tenant("T1")) == {"T9"}
    assert (
        logic.foreign_teams({"event": {"user_team": "T1", "source_team": "T1"}}, logic.Tenant("T1")) == set()
    )
    assert logic.foreign_teams({"user": {"id": "U9", "team_id": "T9"}}, logic.Tenant("T1")) == {"T9"}
    # In a Grid org another workspace's people may belong here too: users.info decides.
    assert logic.foreign_teams(envelope, logic.Tenant("T1", "E1")) == set()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ask <@U02BOB>", "ask @bobby"),
        ("ask <@U09NEW|newbie>", "ask @newbie"),
        ("ask <@W0GRID>", "ask @W0GRID"),
        ("in <#C01GENERAL|general> or <#C0PRIV>", "in #general or #C0PRIV"),
        (
            "<!channel> <!here|here> <!everyone>",
            f"@{WORD_JOINER}channel @{WORD_JOINER}here @{WORD_JOINER}everyone",
        ),
        ("ping <!subteam^S0ONCALL|@oncall> and <!subteam^S1|devs>", "ping @oncall and @devs"),
        ("at <!date^1392734382^{date_short}|Feb 18, 2014>", "at Feb 18, 2014"),
        (
            "see <https://x.example/a?b=1|docs> <mailto:a@b.c>",
            "see docs (<https://x.example/a?b=1>) <mailto:a@b.c>",  # a masked link shows where it goes
        ),
        ("a < b && c > d, <not markup>", "a &lt; b &amp;&amp; c &gt; d, &lt;not markup&gt;"),
        (
            "plain @here and @Channel stay words",
            f"plain @{WORD_JOINER}here and @{WORD_JOINER}Channel stay words",
        ),
    ],
)
def test_neutralize_leaves_no_mention(text, expected):
    assert neutralize(text, {"U02BOB": "bobby"}) == expected


def test_user_ids_are_what_neutralize_wants_names_for():
    assert user_ids("<@U1> <@U2|two> <#C1> <!here> <@U1>") == {"U1", "U2"}


def test_only_bots_are_ignored_and_a_mention_is_its_message():
    human = {"type": "app_mention", "user": "U02BOB", "channel": "C1", "ts": "1.2", "text": "hi"}
    assert not logic.from_a_bot(human, "U0DOPPEL")
    assert logic.from_a_bot({**human, "bot_id": "B1"}, "U0DOPPEL")
    assert logic.from_a_bot({**human, "bot_profile": {"id": "B1"}}, "U0DOPPEL")
    assert logic.from_a_bot({**human, "subtype": "bot_message"}, "U0DOPPEL")
    assert logic.from_a_bot({**human, "user": "U0DOPPEL"}, "U0DOPPEL")
    edit = {**human, "text": "hi!", "edited": {"user": "U02BOB", "ts": "3.4"}}
    assert logic.mention_key(edit) == logic.mention_key(human) != logic.mention_key({**human, "ts": "1.3"})


def test_a_doppel_with_a_served_adapter_answers_whatever_its_phase():
    adapter = {"servedName": "alice-v2", "path": "/a", "version": 2}
    for phase in ("Pending", "Scraping", "Training", "Registering", "Ready", "Failed"):
        doppel = {"metadata": {"name": "alice"}, "status": {"phase": phase, "adapter": adapter}}
        assert logic.served_name(doppel) == "alice-v2"
    assert logic.served_name({"metadata": {"name": "alice"}, "status": {"phase": "Training"}}) is None
