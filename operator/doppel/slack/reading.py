"""Reading Slack messages for samples: names, addressees, text as the model sees it.

- `display_names`: user ID -> the name Slack shows, from the user list or the profile embedded in messages;
- `handles`: casefolded handles and display names -> user ID, to read "handle: …" addressees;
- `read_text`: a message's text as it goes into samples: normalised, pastes dropped, scrubbed, pastes cut,
  each counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from doppel.slack.normalize import UNKNOWN_USER, message_text, user_display_name
from doppel.slack.scrub import PLACEHOLDERS, scrub_text

if TYPE_CHECKING:
    from doppel.slack.samples import ScrapeOptions, Thread

_PLACEHOLDER_CHARS = max(map(len, PLACEHOLDERS))


def display_names(users: Sequence[Mapping[str, Any]], threads: Sequence[Thread]) -> dict[str, str]:
    """User ID -> display name from the user list, else from the profile Slack embeds in messages."""
    names: dict[str, str] = {}
    for thread in threads:
        for message in thread.messages:
            profile = message.get("user_profile")
            if profile and message.get("user"):
                names.setdefault(
                    str(message["user"]), user_display_name({"id": UNKNOWN_USER, "profile": profile})
                )
    return {**names, **{u["id"]: user_display_name(u) for u in users}}


def handles(users: Iterable[Mapping[str, Any]], names: Mapping[str, str]) -> dict[str, str]:
    """Casefolded handle or display name -> user ID (names several people share are left out)."""
    found: dict[str, set[str]] = {}
    for user in users:
        profile = user.get("profile") or {}
        for name in (user.get("name"), profile.get("display_name"), names.get(str(user.get("id")))):
            if name and " " not in str(name):
                found.setdefault(str(name).casefold(), set()).add(str(user["id"]))
    return {name: ids.pop() for name, ids in found.items() if len(ids) == 1}


def read_text(
    message: Mapping[str, Any],
    names: Mapping[str, str],
    channel_names: Mapping[str, str],
    options: ScrapeOptions,
    counts: Mapping[str, Counter[str]],
    regions: Sequence[str] = (),
) -> str | None:
    """A message's text as it goes into samples: read, scrubbed, pastes cut (or None: dropped)."""
    text = message_text(message, names, channel_names, options.bot_user_id)
    paste = is_paste(text, options.paste_chars)
    if paste and options.paste_action == "drop":
        counts["dropped"]["paste"] += 1
        return None
    # Scrubbed whole before a paste is cut: cut first, a secret straddling the cut would keep its first
    # characters, too few to be found as one.
    if options.scrub:
        text, found = scrub_text(text, regions)
        counts["scrubbed"].update(found)
    if paste:
        text = cut_paste(text, options.paste_chars)
        counts["cut"]["paste"] += 1
    return text


def is_paste(text: str, limit: int) -> bool:
    """Longer than `limit` and mostly inside ``` blocks: a log or code paste, not conversation."""
    if len(text) <= limit:
        return False
    fenced = sum(len(block) for block in text.split("```")[1::2])
    return fenced * 2 >= len(text)


def cut_paste(text: str, limit: int) -> str:
    """The first `limit` characters of a paste, its code block closed; a placeholder the cut goes through
    is left out whole (`<sec` is no word to learn)."""
    start = text.rfind("<", max(0, limit - _PLACEHOLDER_CHARS), limit)
    if start >= 0 and text.startswith(PLACEHOLDERS, start) and text.find(">", start) >= limit:
        limit = start
    kept = text[:limit].rstrip()
    return kept + ("\n…```" if kept.count("```") % 2 else "\n…")
