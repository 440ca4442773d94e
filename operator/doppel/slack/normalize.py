"""Slack message markup to plain text, as a person reading the message would see it.

Slack stores mentions and links as `<...>` entities and escapes `&`, `<`, `>`. The model should learn and
answer in plain text, so every entity becomes its readable form:

    <@U123>            -> @display name     (the bot's own user -> BOT_HANDLE)
    <#C123|name>       -> #name             (<#C123> -> #name looked up, else #C123)
    <!here> <!channel> -> @here @channel    (<!subteam^S1|@team> -> @team, <!date^...|text> -> text)
    <url|label>        -> label (url)       (label equal to the address -> the address alone)
    <url>              -> url
    &amp; &lt; &gt;    -> & < >
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

BOT_HANDLE = "@doppel"

_ENTITY = re.compile(r"<([^<>]*)>")


def user_display_name(user: Mapping[str, Any]) -> str:
    """The name Slack shows for a user: display name, else real name, else the account name."""
    profile = user.get("profile") or {}
    for name in (
        profile.get("display_name"),
        profile.get("real_name"),
        user.get("real_name"),
        user.get("name"),
    ):
        if name:
            return str(name)
    return str(user.get("id", "unknown"))


def normalize_text(
    text: str,
    users: Mapping[str, str],
    channels: Mapping[str, str] | None = None,
    bot_user_id: str | None = None,
) -> str:
    """Plain text of a Slack message; `users` maps user ID -> display name, `channels` ID -> name."""
    channels = channels or {}

    def entity(match: re.Match[str]) -> str:
        body = match.group(1)
        target, _, label = body.partition("|")
        if target.startswith("@"):
            user_id = target[1:]
            if bot_user_id and user_id == bot_user_id:
                return BOT_HANDLE
            return "@" + (users.get(user_id) or label or user_id)
        if target.startswith("#"):
            channel_id = target[1:]
            return "#" + (label or channels.get(channel_id) or channel_id)
        if target.startswith("!"):
            return _special(target[1:], label)
        if not label:
            return target
        if label == target or f"mailto:{label}" == target:
            return label
        return f"{label} ({target})"

    return _unescape(_ENTITY.sub(entity, text)).strip()


def _special(command: str, label: str) -> str:
    """`<!here>`, `<!subteam^ID|@handle>`, `<!date^...|fallback>` and friends."""
    if label:
        return label
    name = command.split("^", 1)[0]
    return "@" + name


def _unescape(text: str) -> str:
    # &amp; last, so that "&amp;lt;" stays the literal "&lt;" the author typed.
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
