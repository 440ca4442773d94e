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


def test_a_message_reads_as_its_authors_own_words():
    from doppel.slack.normalize import message_author, message_text

    share = "<@U1|alice> uploaded a file: <https://x.slack.com/files/U1/F0VQ4C4BT/a.js|a.js>"
    assert message_text({"subtype": "file_share", "text": share}, USERS) == ""
    assert message_text(
        {"subtype": "file_share", "text": share + " and commented: look &gt; here"}, USERS
    ) == ("look > here")
    comment = {
        "subtype": "file_comment",
        "text": "<@U2> commented on ...",
        "comment": {"user": "U2", "comment": "ok"},
    }
    assert (message_text(comment, USERS), message_author(comment)) == ("ok", "U2")
    canvas = {"text": "notes:\nF07A32DC2GG", "files": [{"id": "F07A32DC2GG", "title": "Weekly Sync"}]}
    assert message_text(canvas, USERS) == "notes:\nWeekly Sync"
    link = "<https://x.slack.com/files/U1/F0VNAKDE2/a.js>"
    assert message_text({"text": link}, USERS) == "https://x.slack.com/files/U1/F0VNAKDE2/a.js"
    blocks = [
        {
            "type": "rich_text",
            "elements": [
                {
                    "type": "rich_text_section",
                    "elements": [{"type": "user", "user_id": "U1"}, {"type": "text", "text": " hi"}],
                },
                {"type": "rich_text_preformatted", "elements": [{"type": "text", "text": "a < b"}]},
            ],
        }
    ]
    assert message_text({"text": "", "blocks": blocks}, USERS) == "@alice hi\n```a < b```"
