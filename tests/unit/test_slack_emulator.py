"""The emulator answers the real slack_sdk clients as Slack would."""

import time

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient
from tests.support.slack_emulator import SlackEmulator
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID


@pytest.fixture
def client(slack_emulator):
    return WebClient(token=ACME_TOKEN, base_url=slack_emulator.base_url)


def test_auth_test_and_wrong_token(slack_emulator, client):
    auth = client.auth_test()
    assert (auth["team_id"], auth["user_id"]) == ("T0ACME001", BOT_USER_ID)
    with pytest.raises(SlackApiError) as err:
        WebClient(token="xoxb-wrong", base_url=slack_emulator.base_url).auth_test()
    assert err.value.response["error"] == "invalid_auth"
    assert [(c.method, c.error) for c in slack_emulator.calls] == [
        ("auth.test", None),
        ("auth.test", "invalid_auth"),
    ]


def test_cursor_pagination_walks_every_user_once(client):
    seen, cursor, pages = [], None, 0
    while True:
        page = client.users_list(limit=3, cursor=cursor)
        seen += [u["id"] for u in page["members"]]
        pages += 1
        cursor = page["response_metadata"]["next_cursor"]
        if not cursor:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 8
    with pytest.raises(SlackApiError, match="invalid_cursor"):
        client.users_list(cursor="garbage")


def test_conversations_list_types_and_archived(client):
    names = lambda **kw: sorted(c["name"] for c in client.conversations_list(**kw)["channels"])  # noqa: E731
    assert names() == ["design", "engineering", "general", "partners", "random"]
    assert names(exclude_archived=True) == ["design", "engineering", "general", "partners"]
    # The bot sees the private channel it is in.
    assert "secret-plans" in names(types="public_channel,private_channel")
    assert names(types="private_channel") == ["secret-plans"]


def test_not_in_channel_until_joined(client):
    with pytest.raises(SlackApiError, match="not_in_channel"):
        client.conversations_history(channel="C02ENG")
    joined = client.conversations_join(channel="C02ENG")
    assert joined["channel"]["is_member"] is True
    assert client.conversations_join(channel="C02ENG")["warning"] == "already_in_channel"
    assert len(client.conversations_history(channel="C02ENG")["messages"]) == 4
    with pytest.raises(SlackApiError, match="channel_not_found"):
        client.conversations_history(channel="C404")
    with pytest.raises(SlackApiError, match="is_archived"):
        client.conversations_join(channel="C03RANDOM")


def test_history_is_newest_first_with_oldest_latest_and_pages(client, slack_workspace):
    general = sorted(
        (
            m
            for m in slack_workspace["messages"]["general"]
            if m.get("thread_ts") in (None, m["ts"]) or m.get("subtype") == "thread_broadcast"
        ),
        key=lambda m: float(m["ts"]),
    )
    full = client.conversations_history(channel="C01GENERAL")["messages"]
    assert [m["ts"] for m in full] == [m["ts"] for m in reversed(general)]
    root = max(full, key=lambda m: m.get("reply_count", 0))
    assert root["reply_count"] == 4 and root["thread_ts"] == root["ts"]
    first = client.conversations_history(channel="C01GENERAL", limit=2)
    assert first["has_more"] is True and len(first["messages"]) == 2
    rest = client.conversations_history(
        channel="C01GENERAL", cursor=first["response_metadata"]["next_cursor"]
    )
    assert [m["ts"] for m in first["messages"] + rest["messages"]] == [m["ts"] for m in full]
    mid = general[2]["ts"]
    assert all(
        float(m["ts"]) > float(mid)
        for m in client.conversations_history(channel="C01GENERAL", oldest=mid)["messages"]
    )
    incl = client.conversations_history(channel="C01GENERAL", oldest=mid, latest=mid, inclusive=True)[
        "messages"
    ]
    assert [m["ts"] for m in incl] == [mid]


def test_replies_start_with_the_root(client):
    history = client.conversations_history(channel="C01GENERAL")["messages"]
    root = max(history, key=lambda m: m.get("reply_count", 0))
    thread = client.conversations_replies(channel="C01GENERAL", ts=root["ts"])["messages"]
    assert thread[0]["ts"] == root["ts"] and len(thread) == 5
    assert all(m["thread_ts"] == root["ts"] for m in thread)
    with pytest.raises(SlackApiError, match="thread_not_found"):
        client.conversations_replies(channel="C01GENERAL", ts="1.000001")


def test_post_message_is_stored_and_read_back(slack_emulator, client):
    posted = client.chat_postMessage(
        channel="C01GENERAL", text="hello there", username="Alice (doppel)", icon_emoji=":robot_face:"
    )
    reply = client.chat_postMessage(channel="C01GENERAL", text="in thread", thread_ts=posted["ts"])
    assert posted["channel"] == "C01GENERAL" and float(reply["ts"]) > float(posted["ts"])
    mine = slack_emulator.posted("C01GENERAL")
    assert [(m["text"], m.get("thread_ts"), m.get("username")) for m in mine] == [
        ("hello there", None, "Alice (doppel)"),
        ("in thread", posted["ts"], None),
    ]
    assert mine[0]["icon_emoji"] == ":robot_face:"
    thread = client.conversations_replies(channel="C01GENERAL", ts=posted["ts"])["messages"]
    assert [m["text"] for m in thread] == ["hello there", "in thread"]
    with pytest.raises(SlackApiError, match="channel_not_found"):
        client.chat_postMessage(channel="C404", text="x")


async def test_async_client_and_users_info(slack_emulator):
    client = AsyncWebClient(token=ACME_TOKEN, base_url=slack_emulator.base_url)
    info = await client.users_info(user="U02BOB")
    assert info["user"]["profile"]["display_name"] == "bobby"
    with pytest.raises(SlackApiError, match="user_not_found"):
        await client.users_info(user="U404")
    chan = await client.conversations_info(channel="C05PARTNER")
    assert chan["channel"]["is_ext_shared"] is True


def test_tokens_map_to_teams(slack_emulator, slack_workspace):
    other = dict(slack_workspace, team={"id": "T0OTHER", "name": "Other", "domain": "other"})
    slack_emulator.add_team(other, token="xoxb-other")
    client = WebClient(token="xoxb-other", base_url=slack_emulator.base_url)
    assert client.auth_test()["team_id"] == "T0OTHER"
    client.chat_postMessage(channel="general", text="only in other")
    assert slack_emulator.posted("C01GENERAL") == []
    assert [m["text"] for m in slack_emulator.posted("C01GENERAL", team=slack_emulator.teams["T0OTHER"])] == [
        "only in other"
    ]


def test_rate_limit_answers_429_with_retry_after(slack_workspace):
    # Tier 2 at 20/min with a burst of 2: the third quick call is refused.
    with SlackEmulator(rate_scale=1.0, burst_seconds=6) as emulator:
        emulator.add_team(slack_workspace, token=ACME_TOKEN)
        client = WebClient(token=ACME_TOKEN, base_url=emulator.base_url)
        client.users_list()
        client.users_list()
        with pytest.raises(SlackApiError) as err:
            client.users_list()
        assert err.value.response.status_code == 429
        assert int(err.value.response.headers["Retry-After"]) >= 1
        assert [c.status for c in emulator.calls_to("users.list")] == [200, 200, 429]
        client.auth_test()  # other methods have their own limits


def test_sync_client_retry_handler_honours_retry_after(slack_workspace):
    with SlackEmulator(rate_scale=30, burst_seconds=0.1) as emulator:
        emulator.add_team(slack_workspace, token=ACME_TOKEN)
        client = WebClient(
            token=ACME_TOKEN,
            base_url=emulator.base_url,
            retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=2)],
        )
        started = time.monotonic()
        client.users_list()
        client.users_list()  # 429, Retry-After: 1, then retried
        assert time.monotonic() - started >= 1
        assert [c.status for c in emulator.calls_to("users.list")] == [200, 429, 200]


def test_fault_injection(slack_emulator, client):
    slack_emulator.fail("conversations.history", 2, status=503)
    for _ in range(2):
        with pytest.raises(SlackApiError) as err:
            client.conversations_history(channel="C01GENERAL")
        assert err.value.response.status_code == 503
    assert client.conversations_history(channel="C01GENERAL")["ok"]
    slack_emulator.vanish_channel("C01GENERAL", after_calls=1)
    client.conversations_history(channel="C01GENERAL")
    with pytest.raises(SlackApiError, match="channel_not_found"):
        client.conversations_history(channel="C01GENERAL")


def test_direct_messages_open_once_and_unknown_channels_are_not_found(slack_emulator, client):
    opened = client.conversations_open(users="U01ALICE")["channel"]["id"]
    again = client.conversations_open(users="U01ALICE")
    assert opened.startswith("D") and again["channel"]["id"] == opened and again["already_open"]
    client.chat_postMessage(channel=opened, text="hi Alice")
    assert [m["text"] for m in slack_emulator.posted(opened)] == ["hi Alice"]
    assert slack_emulator.dm_channel("U01ALICE") == opened
    for call, error in (
        (lambda: client.conversations_open(users="U0NOBODY"), "user_not_found"),
        (lambda: client.chat_postMessage(channel="D0SOMEONE", text="x"), "channel_not_found"),
    ):
        with pytest.raises(SlackApiError) as err:
            call()
        assert err.value.response["error"] == error


def test_chat_post_message_is_limited_per_channel(slack_workspace):
    with SlackEmulator(rate_scale=1000.0, post_limit=(1.0, 2.0)) as emulator:
        emulator.add_team(slack_workspace, token=ACME_TOKEN, bot_user_id=BOT_USER_ID)
        client = WebClient(token=ACME_TOKEN, base_url=emulator.base_url)
        client.chat_postMessage(channel="C01GENERAL", text="1")
        client.chat_postMessage(channel="C01GENERAL", text="2")
        with pytest.raises(SlackApiError) as err:
            client.chat_postMessage(channel="C01GENERAL", text="3")
        assert err.value.response.status_code == 429 and err.value.response["error"] == "ratelimited"
        assert int(err.value.response.headers["Retry-After"][0]) >= 1
        other = next(c for c in emulator.team.channels if c != "C01GENERAL")
        client.chat_postMessage(channel=other, text="elsewhere")  # another channel has its own limit
        # An injected 429 looks like Slack's too, so slack_sdk's retry handler waits it out.
        emulator.fail("users.info", 1, 429)
        retrying = WebClient(
            token=ACME_TOKEN, base_url=emulator.base_url, retry_handlers=[RateLimitErrorRetryHandler()]
        )
        assert retrying.users_info(user="U01ALICE")["user"]["id"] == "U01ALICE"


def test_non_marketplace_profile_one_call_a_minute_pages_of_15(slack_workspace):
    # 60x compressed: a minute is a second; Retry-After is in Slack's seconds (about a minute).
    with SlackEmulator(rate_scale=60, rate_profile="non-marketplace") as emulator:
        emulator.add_team(slack_workspace, token=ACME_TOKEN, bot_user_id=BOT_USER_ID)
        client = WebClient(token=ACME_TOKEN, base_url=emulator.base_url)
        page = client.conversations_history(channel="C01GENERAL", limit=200)
        assert len(page["messages"]) <= 15
        with pytest.raises(SlackApiError) as err:
            client.conversations_history(channel="C01GENERAL")
        assert err.value.response.status_code == 429
        assert 55 <= int(err.value.response.headers["Retry-After"]) <= 60
        client.users_list()  # other methods keep their tiers
        assert emulator.allowed_per_minute("conversations.replies") == 60
        assert emulator.page_cap("conversations.replies") == 15 and emulator.page_cap("users.list") == 1000


def test_deleted_root_leaves_a_tombstone_with_readable_replies(slack_emulator, client):
    history = client.conversations_history(channel="C01GENERAL")["messages"]
    root = max(history, key=lambda m: m.get("reply_count", 0))
    slack_emulator.delete_message("C01GENERAL", root["ts"])
    after = client.conversations_history(channel="C01GENERAL")["messages"]
    tomb = next(m for m in after if m["ts"] == root["ts"])
    assert (tomb["subtype"], tomb["user"], tomb["hidden"]) == ("tombstone", "USLACKBOT", True)
    assert tomb["reply_count"] == root["reply_count"] and tomb["latest_reply"] == root["latest_reply"]
    thread = client.conversations_replies(channel="C01GENERAL", ts=root["ts"])["messages"]
    assert thread[0]["subtype"] == "tombstone" and len(thread) == root["reply_count"] + 1


def test_error_answers_slack_gives(slack_emulator, client):
    slack_emulator.set_scopes({"channels:read"})
    with pytest.raises(SlackApiError) as err:
        client.conversations_history(channel="C01GENERAL")
    assert err.value.response["error"] == "missing_scope"
    assert (err.value.response["needed"], err.value.response["provided"]) == (
        "channels:history",
        "channels:read",
    )
    slack_emulator.set_scopes(None)
    for kwargs, error in [
        ({"oldest": "yesterday"}, "invalid_ts_oldest"),
        ({"latest": "-5"}, "invalid_ts_latest"),
        ({"limit": "many"}, "invalid_limit"),
        ({"cursor": "bm9wZTo1"}, "invalid_cursor"),
    ]:
        with pytest.raises(SlackApiError, match=error):
            client.conversations_history(channel="C01GENERAL", **kwargs)
    assert client.conversations_history(channel="C01GENERAL")["ok"]  # the bot is in it
    slack_emulator.remove_member("C01GENERAL")
    with pytest.raises(SlackApiError, match="not_in_channel"):
        client.conversations_history(channel="C01GENERAL")
    slack_emulator.team.channels["C01GENERAL"]["is_limited_access"] = True
    with pytest.raises(SlackApiError, match="channel_is_limited_access"):
        client.conversations_history(channel="C01GENERAL")
    slack_emulator.revoke_token()
    with pytest.raises(SlackApiError, match="token_revoked"):
        client.auth_test()
