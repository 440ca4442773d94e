"""Whose samples and from where: the person, the channels taken, the messages that are someone's own words.

- `resolve_person` finds the target by user ID, handle or real name;
- `select_channels` applies the default channel policy and the include/exclude lists (`channel_skip_reason`
  says why a channel is not taken); `list_channels` records every channel in the manifest;
- `skip_reason` says why a message is not a person's own words (bots, joins, topic changes...).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from doppel.errors import BadInput
from doppel.slack.normalize import message_author, user_display_name

if TYPE_CHECKING:
    from doppel.slack.samples import Manifest, ScrapeOptions

# Subtypes whose text is the author's own words; every other subtype (joins, leaves, topic and purpose
# changes, pins, bot messages...) is Slack talking, not the person.
KEPT_SUBTYPES = frozenset({"thread_broadcast", "file_share", "file_comment", "me_message"})


@dataclass(frozen=True)
class Person:
    id: str
    name: str  # the name the system prompt uses


def resolve_person(users: Iterable[Mapping[str, Any]], query: str) -> Person:
    """The one human user whose ID, handle (display or account name) or real name is `query`."""
    users = list(users)
    humans = [u for u in users if not _is_bot(u)]
    wanted = _fold(query.strip().lstrip("@"))
    for matcher in (_by_id, _by_handle, _by_real_name):
        found = [u for u in humans if wanted in matcher(u)]
        if len(found) == 1:
            user = found[0]
            profile = user.get("profile") or {}
            name = profile.get("real_name") or user.get("real_name") or user_display_name(user)
            return Person(id=user["id"], name=str(name))
        if len(found) > 1:
            names = ", ".join(f"{u['id']} ({_describe(u)})" for u in found)
            raise BadInput(f"user {query!r} is ambiguous: {names}; pass a user ID")
    bots = [u for u in users if _is_bot(u) and any(wanted in m(u) for m in (_by_id, _by_handle))]
    if bots:
        raise BadInput(f"{query!r} is a bot ({bots[0].get('id')}), not a person: doppel clones people")
    close = sorted(_describe(u) for u in humans if wanted[:3] and wanted[:3] in _fold(_describe(u)))
    hint = f"; similar: {', '.join(close[:5])}" if close else ""
    raise BadInput(f"no user {query!r} in this workspace{hint}")


def _is_bot(user: Mapping[str, Any]) -> bool:
    return bool(user.get("is_bot")) or user.get("id") == "USLACKBOT"


def _fold(name: str) -> str:
    """A name as compared: case and Unicode composition aside (macOS types "é" as e + an accent)."""
    return unicodedata.normalize("NFC", name).casefold()


def _by_id(user: Mapping[str, Any]) -> set[str]:
    return {_fold(str(user.get("id", "")))}


def _by_handle(user: Mapping[str, Any]) -> set[str]:
    profile = user.get("profile") or {}
    return {_fold(str(n)) for n in (profile.get("display_name"), user.get("name")) if n}


def _by_real_name(user: Mapping[str, Any]) -> set[str]:
    profile = user.get("profile") or {}
    return {_fold(str(n)) for n in (profile.get("real_name"), user.get("real_name")) if n}


def _describe(user: Mapping[str, Any]) -> str:
    profile = user.get("profile") or {}
    return f"@{user_display_name(user)} / {profile.get('real_name') or user.get('real_name') or '?'}"


def select_channels(channels: Iterable[Mapping[str, Any]], options: ScrapeOptions) -> list[Mapping[str, Any]]:
    """Channels to scrape, sorted by name (see `channel_skip_reason`); an unknown name in the
    include/exclude lists is bad input."""
    channels = list(channels)
    known = {c["id"] for c in channels} | {c["name"] for c in channels}
    unknown = [ref for ref in (*options.channels, *options.exclude_channels) if ref.lstrip("#") not in known]
    if unknown:
        names = ", ".join(sorted(c["name"] for c in channels))
        raise BadInput(f"unknown channel(s) {', '.join(unknown)}; available: {names}")
    return sorted((c for c in channels if channel_skip_reason(c, options) is None), key=lambda c: c["name"])


def channel_skip_reason(channel: Mapping[str, Any], options: ScrapeOptions) -> str | None:
    """Why `channel` is not scraped, or None when it is.

    A channel named in `options.channels` is taken whatever its kind (the user asked for it); otherwise
    public channels, archived ones when `include_archived` (an export's default), private channels and DMs
    only when asked for, channels shared with other organisations never.
    """
    refs = {channel["id"], channel["name"]}
    if refs & {ref.lstrip("#") for ref in options.exclude_channels}:
        return "excluded (--exclude-channel)"
    include = {ref.lstrip("#") for ref in options.channels}
    if include:
        return None if refs & include else "not named by --channel"
    if channel.get("is_im") or channel.get("is_mpim"):
        return None if options.include_dms else "direct messages (--include-dms takes them)"
    if channel.get("is_ext_shared") or channel.get("is_shared"):
        return "shared with another organisation (--channel takes it)"
    if channel.get("is_private") or channel.get("is_group"):
        return None if options.include_private else "private (--include-private takes it)"
    if channel.get("is_archived") and not options.include_archived:
        return "archived" + (" (--exclude-archived)" if options.include_archived is False else "")
    return None


def list_channels(
    manifest: Manifest,
    channels: Iterable[Mapping[str, Any]],
    options: ScrapeOptions,
    messages: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> None:
    """Every channel in the manifest: those taken with their counts, the others `skipped` with the reason
    and, where their `messages` are known (an export), how many are the person's own."""
    person, elsewhere = manifest.person["id"], 0
    for channel in channels:
        entry = manifest.channels.setdefault(
            channel["name"], {"id": channel["id"], "messages": 0, "threads": 0}
        )
        reason = channel_skip_reason(channel, options)
        if reason:
            entry["skipped"] = reason
            if messages is not None:
                seen = messages.get(channel["id"], [])
                own = sum(1 for m in seen if message_author(m) == person and not skip_reason(m))
                entry.update(messages=len(seen), person_messages=own)
                elsewhere += own
    manifest.person_messages["in_skipped_channels"] = elsewhere


def skip_reason(message: Mapping[str, Any]) -> str | None:
    """Why a message is not someone's own words, or None when it is."""
    subtype = message.get("subtype")
    if message.get("bot_id") or subtype == "bot_message":
        return "bot"
    if subtype and subtype not in KEPT_SUBTYPES:
        return f"subtype:{subtype}"
    if not message_author(message):
        return "no_user"
    return None
