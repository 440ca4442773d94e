"""From Slack messages to training samples: pure logic shared by the API scrape and the export import.

Both sources reduce to the same inputs (users, channels, raw messages per channel) and go through the
same functions here, which is what makes their samples identical for the same messages:

- `resolve_person` finds the target by user ID, handle or real name;
- `select_channels` applies the default channel policy and the include/exclude lists (`channel_skip_reason`
  says why a channel is not taken);
- `threads_from_messages` groups a channel's messages into threads by `thread_ts`, root first;
- `build_samples` reads each message (`doppel.slack.normalize.message_text`), cuts or drops pastes,
  scrubs secrets and personal data (`doppel.slack.scrub.scrub_text`), and turns each long-enough message
  of the person into one sample through `doppel.slack.conversation.build_conversation`: a thread reply with
  the thread before it as context, a channel message with its window (`channel_window`); it counts what
  it kept, cut, scrubbed and dropped;
- `write_output` merges with an earlier run's samples (no duplicates, newest kept) and writes
  `samples.jsonl` then `manifest.json`, each atomically; with no samples at all it writes nothing and
  says why in one line (`BadInput`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from doppel.errors import BadInput
from doppel.fsutil import atomic_write_text
from doppel.slack.conversation import (
    DEFAULT_BUDGET_CHARS,
    DEFAULT_WINDOW_GAP_S,
    DEFAULT_WINDOW_MESSAGES,
    ThreadMessage,
    WindowRule,
    build_conversation,
    channel_window,
)
from doppel.slack.normalize import UNKNOWN_USER, message_author, message_text, user_display_name
from doppel.slack.scrub import message_regions, scrub_text

# Subtypes whose text is the author's own words; every other subtype (joins, leaves, topic and purpose
# changes, pins, bot messages...) is Slack talking, not the person.
KEPT_SUBTYPES = frozenset({"thread_broadcast", "file_share", "file_comment", "me_message"})
SAMPLES_FILE = "samples.jsonl"
MANIFEST_FILE = "manifest.json"
SECONDS_PER_DAY = 86400


@dataclass
class ScrapeOptions:
    """What to scrape and how to turn it into samples; the CLI's options, for callers in Python."""

    channels: Sequence[str] = ()  # names or IDs to include (then private/archived/shared allowed)
    exclude_channels: Sequence[str] = ()
    cutoff_days: float = 365
    min_length: int = 100
    max_samples: int = 500
    budget_chars: int = DEFAULT_BUDGET_CHARS
    window_gap_s: float = DEFAULT_WINDOW_GAP_S
    window_messages: int = DEFAULT_WINDOW_MESSAGES
    include_archived: bool | None = None  # None: as the source has it (exports: yes; the Web API: no)
    include_private: bool = False
    include_dms: bool = False  # direct messages and group DMs
    paste_chars: int = 500  # a message longer than this and mostly code or log blocks is a paste
    paste_action: str = "drop"  # or "cut": keep its first paste_chars characters
    scrub: bool = True
    # National phone formats read by the scrubber (ISO 3166 codes; none: US); each author's and the
    # person's time zone (a Slack user's `tz`) add their country.
    phone_regions: Sequence[str] = ()
    team: str | None = None
    bot_user_id: str | None = None  # the bot's own mention becomes BOT_HANDLE
    now: float | None = None  # fixed clock for reproducible cutoffs (an export: its newest message)

    def cutoff_ts(self) -> float:
        now = self.now if self.now is not None else dt.datetime.now(dt.UTC).timestamp()
        return now - self.cutoff_days * SECONDS_PER_DAY

    def window_rule(self) -> WindowRule:
        return WindowRule(self.window_gap_s, self.window_messages)


@dataclass(frozen=True)
class Person:
    id: str
    name: str  # the name the system prompt uses


@dataclass
class Thread:
    channel_id: str
    channel_name: str
    ts: str
    messages: list[dict[str, Any]]  # raw Slack messages, oldest first, root first


@dataclass
class Manifest:
    """What a scrape saw, kept and dropped; written as OUT/manifest.json."""

    source: str
    team: str
    person: dict[str, str]
    samples: int = 0
    added: int = 0
    threads: int = 0
    messages: int = 0
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    scrubbed: dict[str, int] = field(default_factory=dict)
    person_messages: dict[str, Any] = field(default_factory=dict)  # the person's own, for the reasons
    cutoff: str | None = None  # messages in threads started before this are not sampled
    time_range: dict[str, str | None] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self, out: Path) -> dict[str, Any]:
        """The CLI's result summary."""
        return {
            "out": str(out),
            "samples": self.samples,
            "added": self.added,
            "channels": sorted(name for name, c in self.channels.items() if not c.get("skipped")),
            "person": self.person["id"],
            "team": self.team,
        }


def ts_key(ts: str) -> tuple[int, int]:
    """Sort key of a Slack timestamp ("seconds.micros"), exact where float() is not."""
    seconds, _, micros = ts.partition(".")
    return int(seconds), int(micros.ljust(6, "0")[:6] or 0)


def resolve_person(users: Iterable[Mapping[str, Any]], query: str) -> Person:
    """The one human user whose ID, handle (display or account name) or real name is `query`."""
    humans = [u for u in users if not u.get("is_bot") and u.get("id") != "USLACKBOT"]
    wanted = query.strip().lstrip("@").casefold()
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
    close = sorted(_describe(u) for u in humans if wanted[:3] and wanted[:3] in _describe(u).casefold())
    hint = f"; similar: {', '.join(close[:5])}" if close else ""
    raise BadInput(f"no user {query!r} in this workspace{hint}")


def _by_id(user: Mapping[str, Any]) -> set[str]:
    return {str(user.get("id", "")).casefold()}


def _by_handle(user: Mapping[str, Any]) -> set[str]:
    profile = user.get("profile") or {}
    return {str(n).casefold() for n in (profile.get("display_name"), user.get("name")) if n}


def _by_real_name(user: Mapping[str, Any]) -> set[str]:
    profile = user.get("profile") or {}
    return {str(n).casefold() for n in (profile.get("real_name"), user.get("real_name")) if n}


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


def threads_from_messages(
    channel_id: str, channel_name: str, messages: Iterable[Mapping[str, Any]], oldest: float
) -> list[Thread]:
    """Group a channel's messages into threads by `thread_ts`; only threads started after `oldest`.

    A message may arrive twice (a reply also sent to the channel is in the history and in its thread);
    the first copy wins. The root comes first, then the replies by `ts` (an imported reply may be stamped
    before its root).
    """
    by_root: dict[str, dict[str, dict[str, Any]]] = {}
    for message in messages:
        ts = message.get("ts")
        if not ts:
            continue
        root = message.get("thread_ts") or ts
        by_root.setdefault(root, {}).setdefault(ts, dict(message))
    threads = []
    for root, msgs in by_root.items():
        if ts_key(root) <= ts_key(f"{oldest:.6f}"):
            continue
        ordered = sorted(msgs.values(), key=lambda m: (m["ts"] != root, ts_key(m["ts"])))
        threads.append(Thread(channel_id, channel_name, root, ordered))
    return sorted(threads, key=lambda t: ts_key(t.ts))


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


def build_samples(
    threads: Sequence[Thread],
    person: Person,
    users: Iterable[Mapping[str, Any]],
    channel_names: Mapping[str, str],
    options: ScrapeOptions,
    *,
    team: str,
    source: str,
) -> tuple[list[dict[str, Any]], Manifest]:
    """Samples (oldest first, at most `max_samples`, the newest kept) and the manifest of this run.

    Threads started before the cutoff are counted (the person's messages there) but not sampled."""
    users = list(users)
    names = _names(users, threads)
    bots = {u["id"] for u in users if u.get("is_bot")}
    zones = {u["id"]: u.get("tz") for u in users}
    manifest = Manifest(source=source, team=team, person=asdict(person), options=_options_view(options))
    counts: dict[str, Counter[str]] = {k: Counter() for k in ("skipped", "dropped", "cut", "scrubbed", "own")}
    oldest = ts_key(f"{options.cutoff_ts():.6f}")
    manifest.cutoff = _iso(options.cutoff_ts())
    rule = options.window_rule()
    newest_own: str | None = None
    samples: list[dict[str, Any]] = []
    flows: dict[str, list[ThreadMessage]] = {}  # channel ID -> its channel messages so far
    for thread in threads:
        stats = manifest.channels.setdefault(
            thread.channel_name, {"id": thread.channel_id, "messages": 0, "threads": 0, "samples": 0}
        )
        if ts_key(thread.ts) <= oldest:
            own = [m for m in thread.messages if message_author(m) == person.id and skip_reason(m) is None]
            counts["own"]["before_cutoff"] += len(own)
            newest_own = max([newest_own or "0", *(m["ts"] for m in own)], key=ts_key)
            continue
        stats["threads"] += 1
        manifest.threads += 1
        flow = flows.setdefault(thread.channel_id, [])
        context: list[ThreadMessage] = []
        for message in thread.messages:
            stats["messages"] += 1
            manifest.messages += 1
            author = message_author(message)
            reason = skip_reason(message)
            if reason is None and author in bots:
                reason = "bot"
            if reason:
                counts["skipped"][reason] += 1
                continue
            in_channel = message["ts"] == thread.ts  # the root: posted in the channel, not in a thread
            regions = message_regions(options.phone_regions, zones.get(author), zones.get(person.id))
            text = _read(message, names, channel_names, options, counts, regions)
            said = ThreadMessage(author, names.get(author, UNKNOWN_USER), text or "", float(message["ts"]))
            if author == person.id:
                counts["own"]["after_cutoff"] += 1
                newest_own = max([newest_own or "0", message["ts"]], key=ts_key)
                if text is None:
                    pass  # a dropped paste, counted
                elif not text:
                    counts["dropped"]["empty"] += 1
                elif len(text) < options.min_length:
                    counts["dropped"]["too_short"] += 1
                else:
                    before = channel_window([*flow, said], rule)[:-1] if in_channel else context
                    samples.append(_sample(thread, message, text, before, person, team, options))
            if text:
                context.append(said)
                if in_channel:
                    flow.append(said)
    samples.sort(key=_sample_order)
    if len(samples) > options.max_samples:
        counts["dropped"]["over_max_samples"] += len(samples) - options.max_samples
        samples = samples[len(samples) - options.max_samples :]
    manifest.skipped = dict(sorted(counts["skipped"].items()))
    manifest.dropped = dict(sorted(counts["dropped"].items()))
    manifest.cut = dict(sorted(counts["cut"].items()))
    manifest.scrubbed = dict(sorted(counts["scrubbed"].items()))
    manifest.person_messages = {**counts["own"], "newest": _iso(float(newest_own)) if newest_own else None}
    return samples, manifest


def _names(users: Sequence[Mapping[str, Any]], threads: Sequence[Thread]) -> dict[str, str]:
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


def _read(
    message: Mapping[str, Any],
    names: Mapping[str, str],
    channel_names: Mapping[str, str],
    options: ScrapeOptions,
    counts: Mapping[str, Counter[str]],
    regions: Sequence[str],
) -> str | None:
    """A message's text as it goes into samples: read, pastes cut (or None: dropped), scrubbed."""
    text = message_text(message, names, channel_names, options.bot_user_id)
    if is_paste(text, options.paste_chars):
        if options.paste_action == "drop":
            counts["dropped"]["paste"] += 1
            return None
        text = cut_paste(text, options.paste_chars)
        counts["cut"]["paste"] += 1
    if options.scrub:
        text, found = scrub_text(text, regions)
        counts["scrubbed"].update(found)
    return text


def is_paste(text: str, limit: int) -> bool:
    """Longer than `limit` and mostly inside ``` blocks: a log or code paste, not conversation."""
    if len(text) <= limit:
        return False
    fenced = sum(len(block) for block in text.split("```")[1::2])
    return fenced * 2 >= len(text)


def cut_paste(text: str, limit: int) -> str:
    """The first `limit` characters of a paste, its code block closed."""
    kept = text[:limit].rstrip()
    return kept + ("\n…```" if kept.count("```") % 2 else "\n…")


def _sample(
    thread: Thread,
    message: Mapping[str, Any],
    text: str,
    context: Sequence[ThreadMessage],
    person: Person,
    team: str,
    options: ScrapeOptions,
) -> dict[str, Any]:
    messages = build_conversation(
        person.name,
        person.id,
        context,
        text,
        channel=thread.channel_name,
        budget_chars=options.budget_chars,
    )
    meta = {
        "team": team,
        "channel": thread.channel_name,
        "channel_id": thread.channel_id,
        "thread_ts": thread.ts,
        "ts": message["ts"],
        "user": person.id,
        "person": person.name,
    }
    if message.get("subtype"):
        meta["subtype"] = message["subtype"]
    return {"messages": messages, "meta": meta}


def _sample_order(sample: Mapping[str, Any]) -> tuple[tuple[int, int], str]:
    return ts_key(sample["meta"]["ts"]), sample["meta"]["channel_id"]


def _sample_key(sample: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = sample["meta"]
    return meta["team"], meta["channel_id"], meta["ts"]


def _options_view(options: ScrapeOptions) -> dict[str, Any]:
    view = asdict(options)
    view.pop("now", None)
    view["channels"] = list(options.channels)
    view["exclude_channels"] = list(options.exclude_channels)
    view["phone_regions"] = list(options.phone_regions)
    return view


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Samples of an earlier run, or [] when there is none."""
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path} is not a samples file (line {exc.lineno}: {exc.msg})") from None


def write_output(
    out: Path, samples: Sequence[dict[str, Any]], manifest: Manifest, max_samples: int
) -> Manifest:
    """Merge `samples` into OUT's earlier ones (no duplicates, newest `max_samples` kept), then write
    samples.jsonl and manifest.json atomically. Refuses to mix two people in one directory."""
    out = Path(out)
    previous_manifest = out / MANIFEST_FILE
    if previous_manifest.exists():
        earlier = json.loads(previous_manifest.read_text(encoding="utf-8"))
        who = (earlier.get("team"), earlier.get("person", {}).get("id"))
        if who != (manifest.team, manifest.person["id"]):
            raise BadInput(
                f"{out} holds samples of {who[1]} in team {who[0]}, not {manifest.person['id']}; "
                "use another --out"
            )
    merged = {_sample_key(s): s for s in read_samples(out / SAMPLES_FILE)}
    before = len(merged)
    for sample in samples:
        merged.setdefault(_sample_key(sample), sample)
    ordered = sorted(merged.values(), key=_sample_order)
    if not ordered:
        raise BadInput(no_samples_reason(manifest))
    if len(ordered) > max_samples:
        manifest.dropped["over_max_samples"] = manifest.dropped.get("over_max_samples", 0) + (
            len(ordered) - max_samples
        )
        ordered = ordered[len(ordered) - max_samples :]
    manifest.samples = len(ordered)
    manifest.added = len(merged) - before
    per_channel = Counter(s["meta"]["channel"] for s in ordered)
    for name, count in per_channel.items():
        manifest.channels.setdefault(name, {"messages": 0, "threads": 0})["samples"] = count
    stamps = [float(s["meta"]["ts"]) for s in ordered]
    manifest.time_range = {
        "oldest": _iso(min(stamps)) if stamps else None,
        "newest": _iso(max(stamps)) if stamps else None,
    }
    lines = "".join(json.dumps(s, ensure_ascii=False, sort_keys=True) + "\n" for s in ordered)
    atomic_write_text(out / SAMPLES_FILE, lines)
    atomic_write_text(out / MANIFEST_FILE, json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
    return manifest


def no_samples_reason(manifest: Manifest) -> str:
    """Why a run ends with no samples of the person, in one line."""
    name = manifest.person["name"]
    own = manifest.person_messages
    after, before, elsewhere = (
        own.get(k, 0) for k in ("after_cutoff", "before_cutoff", "in_skipped_channels")
    )
    options = manifest.options
    if not after and not before and elsewhere:
        skipped = "; ".join(
            f"#{n}: {c['skipped']}" for n, c in manifest.channels.items() if c.get("person_messages")
        )
        return f"all {elsewhere} messages of {name} are in channels not taken: {skipped}"
    if not after and not before:
        # The Web API is asked only for messages after the cutoff; an export shows them all.
        since = f" since the cutoff {manifest.cutoff}" if manifest.source == "api" else ""
        return f"{name} wrote no messages in the channels taken{since} ({manifest.source})"
    if not after:
        return (
            f"none of {name}'s {before} messages is after the cutoff {manifest.cutoff} "
            f"(--cutoff-days {options.get('cutoff_days'):g}); the newest is from {own.get('newest')}"
        )
    short = manifest.dropped.get("too_short", 0)
    if short == after:
        limit = options.get("min_length")
        return f"all {short} messages of {name} after the cutoff are shorter than --min-length {limit}"
    why = ", ".join(f"{k}: {v}" for k, v in manifest.dropped.items())
    return f"none of {name}'s {after} messages after the cutoff makes a sample ({why})"


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
