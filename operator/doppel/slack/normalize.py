"""Slack message markup to plain text, as a person reading the message would see it.

Slack stores mentions and links as `<...>` entities and escapes `&`, `<`, `>`. The model should learn and
answer in plain text, so every entity becomes its readable form:

    <@U123>            -> @display name     (the bot's own user -> BOT_HANDLE; unknown -> @someone)
    <#C123|name>       -> #name             (<#C123> -> #name looked up, else #some-channel)
    <!here> <!channel> -> @here @channel    (<!subteam^S1|@team> -> @team, <!date^...|text> -> text)
    <url|label>        -> label (url)       (label equal to the address -> the address alone)
    <tel:..|label>     -> label             (so is <mailto:..|label>: the label is what the reader sees)
    <url>              -> url
    &amp; &lt; &gt;    -> & < >

Raw IDs never survive: a user or channel nobody can name becomes a neutral placeholder. Runs of blank lines
collapse to one. `addressee` reads whom a message is addressed to, before any of this. `message_text`
reads a whole message: `rich_text` blocks when `text` is empty, the
person's own words of a file share or file comment (never Slack's "uploaded a file" wording), file IDs
replaced by the file's title.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

BOT_HANDLE = "@doppel"

UNKNOWN_USER = "someone"
UNKNOWN_CHANNEL = "some-channel"

_ENTITY = re.compile(r"<([^<>]*)>")
_BLANK_RUN = re.compile(r"\n[ \t]*(?:\n[ \t]*)+\n")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_LEADING_MENTION = re.compile(r"^\s*<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
_LEADING_HANDLE = re.compile(r"^\s*@?([\w.\-]{2,40}):\s")
# Slack's own wording of old-style file shares and comments; only the comment is the person's.
_FILE_SHARE = re.compile(
    r"^<@[^>]*> (?:uploaded|shared) a file: <[^>]*>(?: and commented: (?P<comment>.*))?$", re.S
)
# A file ID standing alone (a canvas or file reference), not one inside a link.
_FILE_ID = re.compile(r"(?<!\S)F(?=[0-9A-Z]*\d)[0-9A-Z]{8,}(?!\S)")


def addressee(raw: str, handles: Mapping[str, str]) -> str | None:
    """The user a message is addressed to, from its raw Slack text: a mention (`<@U…>`) at its start, or a
    known handle followed by a colon ("jyellick: …", common in older workspaces); `handles` maps casefolded
    handles and display names to user IDs."""
    match = _LEADING_MENTION.match(raw)
    if match:
        return match[1]
    match = _LEADING_HANDLE.match(raw)
    if match:
        return handles.get(match[1].casefold())
    return None


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
            return "@" + (users.get(user_id) or label or UNKNOWN_USER)
        if target.startswith("#"):
            channel_id = target[1:]
            return "#" + (label or channels.get(channel_id) or UNKNOWN_CHANNEL)
        if target.startswith("!"):
            return _special(target[1:], label)
        if not label:
            return target.removeprefix("mailto:").removeprefix("tel:")
        if label == target or target.startswith(("mailto:", "tel:")):
            return label
        return f"{label} ({target})"

    plain = _unescape(_ENTITY.sub(entity, text))
    return _BLANK_RUN.sub("\n\n", _TRAILING_SPACE.sub("\n", plain)).strip()


def message_text(
    message: Mapping[str, Any],
    users: Mapping[str, str],
    channels: Mapping[str, str] | None = None,
    bot_user_id: str | None = None,
) -> str:
    """Plain text of the words a message's author wrote (see the module doc)."""
    if message.get("subtype") == "file_comment":
        raw = str((message.get("comment") or {}).get("comment") or "")
    else:
        raw = str(message.get("text") or "")
        share = _FILE_SHARE.match(raw)
        if share:
            raw = share.group("comment") or ""
        elif not raw.strip():
            raw = rich_text_markup(message.get("blocks") or [])
    titles = {
        str(f["id"]): str(f.get("title") or f.get("name") or "")
        for f in message.get("files") or []
        if f.get("id")
    }
    text = normalize_text(raw, users, channels, bot_user_id)
    return _FILE_ID.sub(lambda m: titles.get(m.group()) or "a file", text)


def message_author(message: Mapping[str, Any]) -> str:
    """Who wrote a message's words: a file comment's author is in the comment."""
    if message.get("subtype") == "file_comment":
        return str((message.get("comment") or {}).get("user") or message.get("user") or "")
    return str(message.get("user") or "")


def rich_text_markup(blocks: Sequence[Mapping[str, Any]]) -> str:
    """Slack markup of `rich_text` blocks, for messages whose `text` is empty: the same entities the
    `text` field would hold, so they go through `normalize_text` like any text."""
    out: list[str] = []
    for block in blocks:
        if block.get("type") == "rich_text":
            parts = [_rich_element(e) for e in block.get("elements") or []]
            # Each section of a block is a line of its own.
            out.append(
                "".join(
                    p if p.endswith("\n") or i == len(parts) - 1 else p + "\n" for i, p in enumerate(parts)
                )
            )
    return "\n".join(part for part in out if part)


def _rich_element(element: Mapping[str, Any]) -> str:
    kind = element.get("type")
    inner = "".join(_rich_element(e) for e in element.get("elements") or [])
    if kind == "rich_text_section":
        return inner
    if kind == "rich_text_preformatted":
        return f"```{inner}```\n"
    if kind == "rich_text_quote":
        return "".join(f"&gt; {line}\n" for line in inner.splitlines())
    if kind == "rich_text_list":
        return "".join(f"• {_rich_element(e)}\n" for e in element.get("elements") or [])
    if kind == "text":
        return _styled(_escape(str(element.get("text") or "")), element)
    if kind == "link":
        url, label = element.get("url") or "", element.get("text")
        return _styled(f"<{url}|{label}>" if label else f"<{url}>", element)
    if kind == "user":
        return _styled(f"<@{element.get('user_id')}>", element)
    if kind == "channel":
        return f"<#{element.get('channel_id')}>"
    if kind == "broadcast":
        return _styled(f"<!{element.get('range')}>", element)
    if kind == "usergroup":
        return f"<!subteam^{element.get('usergroup_id')}>"
    if kind == "emoji":
        return f":{element.get('name')}:"
    if kind == "date":
        return _escape(str(element.get("fallback") or ""))
    if kind == "canvas":
        return str(element.get("file_id") or "")
    return inner


def _styled(markup: str, element: Mapping[str, Any]) -> str:
    """Slack's mrkdwn marks around a styled piece, in the order Slack writes them (`~_*`x`*_~`); the
    spaces around the piece stay outside the marks."""
    style = element.get("style") or {}
    core = markup.strip()
    if not core:
        return markup
    for flag, mark in (("code", "`"), ("bold", "*"), ("italic", "_"), ("strike", "~")):
        if style.get(flag):
            core = f"{mark}{core}{mark}"
    lead = markup[: len(markup) - len(markup.lstrip())]
    return lead + core + markup[len(markup.rstrip()) :]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _special(command: str, label: str) -> str:
    """`<!here>`, `<!subteam^ID|@handle>`, `<!date^...|fallback>` and friends."""
    if label:
        return label
    name = command.split("^", 1)[0]
    return "@" + name


def _unescape(text: str) -> str:
    # &amp; last, so that "&amp;lt;" stays the literal "&lt;" the author typed.
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
