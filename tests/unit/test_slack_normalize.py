"""Slack markup becomes the plain text a reader sees."""

import pytest

from doppel.slack.normalize import BOT_HANDLE, normalize_text, user_display_name

USERS = {"U1": "alice", "U2": "Bob Chen"}
CHANNELS = {"C1": "general"}


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("hi <@U1>", "hi @alice"),
        ("<@U2> and <@U1>", "@Bob Chen and @alice"),
        ("<@U9|ghost> left", "@ghost left"),
        ("<@U9>", "@someone"),
        ("see <#C7|eng>", "see #eng"),
        ("see <#C1>", "see #general"),
        ("see <#C7>", "see #some-channel"),
        ("<https://x.io/a?b=1&amp;c=2|the doc>", "the doc (https://x.io/a?b=1&c=2)"),
        ("<https://x.io>", "https://x.io"),
        ("<https://x.io|https://x.io>", "https://x.io"),
        ("<mailto:a@b.io|a@b.io>", "a@b.io"),
        ("<mailto:a@b.io|Ann>", "Ann"),
        ("call <tel:123|123> or <tel:+14155550100|the office>", "call 123 or the office"),
        ("a\n\n\n  \n\n\nb  \nc", "a\n\nb\nc"),
        ("<!here> <!channel> <!everyone>", "@here @channel @everyone"),
        ("<!subteam^S1|@editors> look", "@editors look"),
        ("<!date^1392734382^{date}|Feb 18, 2014> ok", "Feb 18, 2014 ok"),
        ("a &amp; b &lt;3 &gt; c", "a & b <3 > c"),
        ("&amp;lt; stays literal", "&lt; stays literal"),
        ("  padded  ", "padded"),
    ],
)
def test_entities_become_plain_text(raw, plain):
    assert normalize_text(raw, USERS, CHANNELS) == plain


def test_bots_own_mention_is_a_fixed_handle():
    text = normalize_text(
        "<@UBOT> what does <@U1> think?", {**USERS, "UBOT": "doppel-prod"}, bot_user_id="UBOT"
    )
    assert text == f"{BOT_HANDLE} what does @alice think?"


def test_display_name_falls_back_to_real_then_account_name():
    assert user_display_name({"id": "U1", "name": "al", "profile": {"display_name": "alice"}}) == "alice"
    assert (
        user_display_name({"id": "U1", "name": "al", "profile": {"display_name": "", "real_name": "Al M"}})
        == "Al M"
    )
    assert user_display_name({"id": "U1", "name": "al", "profile": {}}) == "al"
    assert user_display_name({"id": "U1"}) == "U1"
