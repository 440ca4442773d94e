"""From Slack messages to training samples: pure logic shared by the API scrape and the export import.

Both sources reduce to the same inputs (users, channels, raw messages per channel) and go through the
same functions here, which is what makes their samples identical for the same messages:

- `doppel.slack.selection` finds the person and the channels to take (re-exported here);
- `threads_from_messages` groups a channel's messages into threads by `thread_ts`, root first;
- `doppel.slack.pairing.build_samples` (re-exported here) turns each long-enough message of the person into
  one sample, paired with what it answers, and counts what it kept, cut, scrubbed and dropped;
- `write_output` merges with an earlier run's samples (no duplicates, newest kept) and writes
  `samples.jsonl`, `colleagues.jsonl` (other people's messages by user ID, for the fidelity report's
  authorship classes), `memory.jsonl` (all the person's messages, short ones too, for their memory index)
  then `manifest.json`, each atomically; with no samples at all it writes nothing and says why in one line
  (`BadInput`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from doppel.defaults import MAX_SAMPLES
from doppel.errors import BadInput
from doppel.fsutil import atomic_write_text
from doppel.slack.conversation import (
    DEFAULT_BUDGET_CHARS,
    DEFAULT_WINDOW_GAP_S,
    DEFAULT_WINDOW_MESSAGES,
    WindowRule,
)
from doppel.slack.pairing import build_samples
from doppel.slack.selection import (
    KEPT_SUBTYPES,
    Person,
    channel_skip_reason,
    list_channels,
    resolve_person,
    select_channels,
    skip_reason,
)

__all__ = [
    "KEPT_SUBTYPES",
    "Manifest",
    "Person",
    "ScrapeOptions",
    "Thread",
    "build_samples",
    "channel_skip_reason",
    "list_channels",
    "resolve_person",
    "select_channels",
    "skip_reason",
    "threads_from_messages",
    "write_output",
]

SAMPLES_FILE = "samples.jsonl"
# Other people's messages, by user ID: the authorship classes of the fidelity report.
COLLEAGUES_FILE = "colleagues.jsonl"
# The person's messages, short ones too, for their memory index (`doppel.memory.index`): what they know,
# beyond the newest samples a training takes.
MEMORY_FILE = "memory.jsonl"
MEMORY_MAX_MESSAGES = 100_000
MANIFEST_FILE = "manifest.json"
SECONDS_PER_DAY = 86400


@dataclass
class ScrapeOptions:
    """What to scrape and how to turn it into samples; the CLI's options, for callers in Python."""

    channels: Sequence[str] = ()  # names or IDs to include (then private/archived/shared allowed)
    exclude_channels: Sequence[str] = ()
    cutoff_days: float = 365
    min_length: int | None = None  # None: the person's own (`doppel.slack.pairing.person_min_length`)
    # What an earlier run chose when `min_length` is None: a Web API run fetches only what is new since, and
    # a median of a day's messages would make that day's samples by another rule.
    earlier_min_length: int | None = None
    max_samples: int = MAX_SAMPLES
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
    now: float | None = None  # the cutoff's clock (an export: the person's newest message in it)

    def cutoff_ts(self) -> float:
        now = self.now if self.now is not None else dt.datetime.now(dt.UTC).timestamp()
        return now - self.cutoff_days * SECONDS_PER_DAY

    def window_rule(self) -> WindowRule:
        return WindowRule(self.window_gap_s, self.window_messages)


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
    pairing: dict[str, Any] = field(default_factory=dict)  # see doppel.slack.pairing
    person_messages: dict[str, Any] = field(default_factory=dict)  # the person's own, for the reasons
    cutoff: str | None = None  # messages in threads started before this are not sampled
    time_range: dict[str, str | None] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    colleagues: dict[str, int] = field(default_factory=dict)  # name -> messages in colleagues.jsonl
    memory: int = 0  # the person's messages in memory.jsonl

    def __post_init__(self) -> None:
        # The colleagues' messages (`doppel.slack.pairing.colleague_messages`) and the person's own for
        # their memory, written beside the samples; not fields: the manifest does not carry them.
        self.colleague_messages: list[dict[str, Any]] = []
        self.memory_entries: list[dict[str, Any]] = []

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


def sample_order(sample: Mapping[str, Any]) -> tuple[tuple[int, int], str]:
    return ts_key(sample["meta"]["ts"]), sample["meta"]["channel_id"]


def _sample_key(sample: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = sample["meta"]
    return meta["team"], meta["channel_id"], meta["ts"]


def options_view(options: ScrapeOptions) -> dict[str, Any]:
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
    """Merge `samples` into OUT's earlier ones (no duplicates, newest `max_samples` kept), and the person's
    messages into memory.jsonl's (newest `MEMORY_MAX_MESSAGES` kept), then write samples.jsonl,
    colleagues.jsonl, memory.jsonl and manifest.json, each atomically. Refuses to mix two people in one
    directory."""
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
    # Scrubbed otherwise than before: nothing earlier is carried over (`scrub_changed`).
    fresh = scrub_changed(out, manifest.options.get("scrub", True) is not False)
    merged = {} if fresh else {_sample_key(s): s for s in read_samples(out / SAMPLES_FILE)}
    before = len(merged)
    for sample in samples:
        merged.setdefault(_sample_key(sample), sample)
    ordered = sorted(merged.values(), key=sample_order)
    if not ordered:
        raise NoSamples(manifest)
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
        "oldest": iso(min(stamps)) if stamps else None,
        "newest": iso(max(stamps)) if stamps else None,
    }
    lines = "".join(json.dumps(s, ensure_ascii=False, sort_keys=True) + "\n" for s in ordered)
    atomic_write_text(out / SAMPLES_FILE, lines)
    if manifest.colleague_messages:
        others = "".join(
            json.dumps(m, ensure_ascii=False, sort_keys=True) + "\n" for m in manifest.colleague_messages
        )
        atomic_write_text(out / COLLEAGUES_FILE, others)
    remembered = _merge_memory(None if fresh else out / MEMORY_FILE, manifest.memory_entries)
    if remembered:
        atomic_write_text(
            out / MEMORY_FILE,
            "".join(json.dumps(m, ensure_ascii=False, sort_keys=True) + "\n" for m in remembered),
        )
    manifest.memory = len(remembered)
    atomic_write_text(out / MANIFEST_FILE, json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
    return manifest


def scraped_scrubbed(out: Path) -> bool | None:
    """Whether the scrape that wrote OUT scrubbed (its manifest.json: only `options.scrub` false says it
    did not); None when OUT has no manifest that can be read."""
    try:
        manifest = json.loads((Path(out) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    options = manifest.get("options") if isinstance(manifest, dict) else None
    return not (isinstance(options, dict) and options.get("scrub") is False)


def scrub_changed(out: Path, scrub: bool) -> bool:
    """Whether OUT's earlier scrape scrubbed otherwise than `scrub` asks. Its samples, memory and
    incremental state are then not carried over: merged, the earlier samples win, so scrubbed ones would stay
    scrubbed under --no-scrub and unscrubbed ones would keep their secrets once scrubbing is back on."""
    earlier = scraped_scrubbed(out)
    return earlier is not None and earlier != scrub


def _merge_memory(path: Path | None, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """memory.jsonl's earlier entries (at `path`, if any) with `entries` (no duplicates, a message's newest
    reading wins), oldest first, the newest `MEMORY_MAX_MESSAGES`."""
    merged = {(e["team"], e["channel_id"], e["ts"]): e for e in (read_samples(path) if path else [])}
    merged.update({(e["team"], e["channel_id"], e["ts"]): e for e in entries})
    ordered = sorted(merged.values(), key=lambda e: (ts_key(e["ts"]), e["channel_id"]))
    return ordered[-MEMORY_MAX_MESSAGES:]


class NoSamples(BadInput):
    """A scrape that found no sample of the person: the reason, and the manifest that says what it saw."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(no_samples_reason(manifest))
        self.manifest = manifest


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
        return f"all {short} messages of {name} after the cutoff are shorter than {min_length_flag(options)}"
    why = ", ".join(f"{k}: {v}" for k, v in manifest.dropped.items())
    return f"none of {name}'s {after} messages after the cutoff makes a sample ({why})"


def not_enough_reason(manifest: Manifest, needed: int) -> str:
    """Why a run has fewer than `needed` samples, in one line: what each filter removed of the person's
    messages, and the flag that changes it."""
    own, dropped, options = manifest.person_messages, manifest.dropped, manifest.options
    parts = [
        (dropped.get("too_short", 0), f"shorter than {min_length_flag(options)}"),
        (dropped.get("paste", 0), "code or log pastes (--paste-action cut keeps their start)"),
        (dropped.get("empty", 0), "without text"),
        (own.get("before_cutoff", 0), f"before the cutoff (--cutoff-days {options.get('cutoff_days'):g})"),
        (own.get("in_skipped_channels", 0), "in channels not taken (--channel takes one)"),
    ]
    removed = "; ".join(f"{count} {why}" for count, why in parts if count)
    total = own.get("after_cutoff", 0) + own.get("before_cutoff", 0) + own.get("in_skipped_channels", 0)
    return (
        f"not enough data: {manifest.samples} samples of {manifest.person['name']}, {needed} needed; "
        f"of their {total} messages: {removed or 'none removed by a filter'}"
    )


def chosen_min_length(out: Path) -> int | None:
    """The minimum length an earlier run into `out` chose itself (no --min-length given), if any."""
    try:
        options = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8")).get("options", {})
    except (OSError, ValueError, AttributeError):
        return None
    chosen = options.get("min_length")
    return chosen if isinstance(chosen, int) and options.get("min_length_given") is False else None


def min_length_flag(options: Mapping[str, Any]) -> str:
    """The minimum length a scrape used, as the flag that sets it: "--min-length 35 (from their median message
    length)" when the scrape chose it (a manifest of a doppel before that choice existed says neither)."""
    chosen = " (from their median message length)" if options.get("min_length_given") is False else ""
    return f"--min-length {options.get('min_length')}{chosen}"


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
