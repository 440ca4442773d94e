"""What the bot posts in a doppel's name is made harmless first: the model writes whatever it learned, and
a raw `<@U…>` pings that person (or another bot, which may answer: a ping-pong), `<!channel>` notifies
everyone, and a masked link `<https://evil.example|the wiki>` shows words that hide where it goes. Pure
functions, tested directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Slack's markup: <@U…|label>, <#C…|label>, <!here>, <!subteam^S…|@team>, <!date^…|fallback>, <url|label>.
_TOKEN = re.compile(r"<([^<>]*)>")
_USER = re.compile(r"^@([UW][A-Z0-9]+)(?:\|(.*))?$")
_CHANNEL = re.compile(r"^#(C[A-Z0-9]+|G[A-Z0-9]+)(?:\|(.*))?$")
_SPECIAL = re.compile(r"^!([a-z]+)(?:\^[^|]*)?(?:\|(.*))?$")
_LINK = re.compile(r"^(?P<url>(https?://|mailto:)[^\s|]+)(\|(?P<label>.*))?$")
# Plain words Slack turns into broadcasts when a client parses the text (`parse=full`, `link_names`).
_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
WORD_JOINER = "\u2060"


def user_ids(text: str) -> set[str]:
    """The user ids mentioned in `text` (what `neutralize` wants names for)."""
    found = set()
    for token in _TOKEN.findall(text):
        match = _USER.match(token)
        if match:
            found.add(match.group(1))
    return found


def neutralize(text: str, names: Mapping[str, str] | None = None) -> str:
    """`text` with every mention turned into plain words: users become `@name` (from `names`, else their
    label or id), channels `#name`, broadcasts and user groups `@here`/`@team` that notify nobody. Links
    stay links that show their target: a masked one (`<url|words>`) becomes `words (<url>)`; any other
    `<`, `>` and `&` is escaped as Slack's formatting rules ask."""
    names = names or {}
    out: list[str] = []
    last = 0
    for match in _TOKEN.finditer(text):
        out.append(_escape(text[last : match.start()]))
        out.append(_plain(match.group(1), names))
        last = match.end()
    out.append(_escape(text[last:]))
    return _BROADCAST.sub(lambda m: f"@{WORD_JOINER}{m.group(1)}", "".join(out))


def _plain(token: str, names: Mapping[str, str]) -> str:
    if user := _USER.match(token):
        return "@" + _escape(names.get(user.group(1)) or user.group(2) or user.group(1))
    if channel := _CHANNEL.match(token):
        return "#" + _escape(channel.group(2) or channel.group(1))
    if special := _SPECIAL.match(token):
        label = special.group(2)
        if special.group(1) in {"subteam", "date"} and label:
            return _escape(label if label.startswith("@") or special.group(1) == "date" else f"@{label}")
        return "@" + special.group(1)
    if link := _LINK.match(token):
        label = link.group("label")
        if label and label != link.group("url"):
            return f"{_escape(label)} (<{link.group('url')}>)"
        return f"<{link.group('url')}>"
    return _escape(f"<{token}>")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
