"""From Slack messages to training samples: pure logic shared by the API scrape and the export import.

Both sources reduce to the same inputs (users, channels, raw messages per channel) and go through the
same functions here, which is what makes their samples identical for the same messages:

- `resolve_person` finds the target by user ID, handle or real name;
- `select_channels` applies the default channel policy and the include/exclude lists;
- `threads_from_messages` groups a channel's messages into threads by `thread_ts`;
- `build_samples` turns each long-enough message of the person into one sample through
  `doppel.slack.conversation.build_conversation`, and counts what it kept and dropped;
- `write_output` merges with an earlier run's samples (no duplicates, newest kept) and writes
  `samples.jsonl` then `manifest.json`, each atomically.
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
from doppel.slack.conversation import DEFAULT_BUDGET_CHARS, ThreadMessage, build_conversation
from doppel.slack.normalize import normalize_text, user_display_name

# Subtypes whose text is the author's own words; every other subtype (joins, leaves, topic and purpose
# changes, pins, bot messages...) is Slack talking, not the person.
KEPT_SUBTYPES = frozenset({"thread_broadcast", "file_share", "me_message"})
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
    team: str | None = None
    bot_user_id: str | None = None  # the bot's own mention becomes BOT_HANDLE
    now: float | None = None  # fixed clock for reproducible cutoffs

    def cutoff_ts(self) -> float:
        now = self.now if self.now is not None else dt.datetime.now(dt.UTC).timestamp()
        return now - self.cutoff_days * SECONDS_PER_DAY


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
    skipped_channels: dict[str, str] = field(default_factory=dict)  # name -> why it could not be scraped
    time_range: dict[str, str | None] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self, out: Path) -> dict[str, Any]:
        """The CLI's result summary."""
        return {
            "out": str(out),
            "samples": self.samples,
            "added": self.added,
            "channels": sorted(self.channels),
            **({"skipped_channels": self.skipped_channels} if self.skipped_channels else {}),
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
    """Channels to scrape, sorted by name.

    By default the public, non-archived, non-shared ones. A channel named in `options.channels` is
    taken whatever its kind (the user asked for it); an unknown name there is bad input.
    """
    channels = list(channels)
    known = {c["id"] for c in channels} | {c["name"] for c in channels}
    unknown = [ref for ref in (*options.channels, *options.exclude_channels) if ref.lstrip("#") not in known]
    if unknown:
        names = ", ".join(sorted(c["name"] for c in channels))
        raise BadInput(f"unknown channel(s) {', '.join(unknown)}; available: {names}")
    include = {ref.lstrip("#") for ref in options.channels}
    exclude = {ref.lstrip("#") for ref in options.exclude_channels}
    chosen = []
    for channel in channels:
        refs = {channel["id"], channel["name"]}
        if refs & exclude:
            continue
        if include:
            if refs & include:
                chosen.append(channel)
        elif not (
            channel.get("is_private")
            or channel.get("is_archived")
            or channel.get("is_ext_shared")
            or channel.get("is_shared")
        ):
            chosen.append(channel)
    return sorted(chosen, key=lambda c: c["name"])


def threads_from_messages(
    channel_id: str, channel_name: str, messages: Iterable[Mapping[str, Any]], oldest: float
) -> list[Thread]:
    """Group a channel's messages into threads by `thread_ts`; only threads started after `oldest`.

    A message may arrive twice (a reply also sent to the channel is in the history and in its thread);
    the first copy wins.
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
        ordered = sorted(msgs.values(), key=lambda m: ts_key(m["ts"]))
        threads.append(Thread(channel_id, channel_name, root, ordered))
    return sorted(threads, key=lambda t: ts_key(t.ts))


def skip_reason(message: Mapping[str, Any]) -> str | None:
    """Why a message is not someone's own words, or None when it is."""
    subtype = message.get("subtype")
    if message.get("bot_id") or subtype == "bot_message":
        return "bot"
    if subtype and subtype not in KEPT_SUBTYPES:
        return f"subtype:{subtype}"
    if not message.get("user"):
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
    """Samples (oldest first, at most `max_samples`, the newest kept) and the manifest of this run."""
    names = {u["id"]: user_display_name(u) for u in users}
    bots = {u["id"] for u in users if u.get("is_bot")}
    manifest = Manifest(source=source, team=team, person=asdict(person), options=_options_view(options))
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    samples: list[dict[str, Any]] = []
    for thread in threads:
        stats = manifest.channels.setdefault(
            thread.channel_name, {"id": thread.channel_id, "messages": 0, "threads": 0, "samples": 0}
        )
        stats["threads"] += 1
        manifest.threads += 1
        context: list[ThreadMessage] = []
        for message in thread.messages:
            stats["messages"] += 1
            manifest.messages += 1
            reason = skip_reason(message)
            if reason is None and message["user"] in bots:
                reason = "bot"
            if reason:
                skipped[reason] += 1
                continue
            text = normalize_text(message.get("text", ""), names, channel_names, options.bot_user_id)
            author = message["user"]
            if author == person.id:
                if not text:
                    dropped["empty"] += 1
                elif len(text) < options.min_length:
                    dropped["too_short"] += 1
                else:
                    samples.append(_sample(thread, message, text, context, person, team, options))
            if text:
                context.append(ThreadMessage(author, names.get(author, author), text))
    samples.sort(key=_sample_order)
    if len(samples) > options.max_samples:
        dropped["over_max_samples"] += len(samples) - options.max_samples
        samples = samples[len(samples) - options.max_samples :]
    manifest.skipped = dict(sorted(skipped.items()))
    manifest.dropped = dict(sorted(dropped.items()))
    return samples, manifest


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


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
