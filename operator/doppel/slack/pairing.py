"""Each of the person's messages paired with what it answers: one training sample per message.

`build_samples` reads every message once (`doppel.slack.reading.read_text`), lays out each channel's flow
(roots and broadcast replies, by time) and each thread, then keeps every message of the person of at least
`MEMORY_MIN_CHARS` for their memory (`Manifest.memory_entries`) and turns every long-enough one into one
sample: its context is `doppel.slack.conversation.reply_context` (the thread, or the channel
window at the channel's pace, plus the message it explicitly answers), formatted by `build_conversation`.

A sample's `meta.kind` is `reply` when its context holds someone else's message, `opener` when the person
opens a topic (nobody else spoke before it in that conversation): the two are different things to learn and
to measure. `meta.context_ts` is the oldest message of the context (the held-out split keeps whole
conversations apart with it) and `meta.reply_offset` where the reply starts in the last turn when the
person's own messages just before it share that turn (they are context there, trained in their own sample).

The manifest's `pairing` says how often the message answered is in the sample: over replies whose answered
message is known (a thread reply: the latest other person's message in the thread; an addressed or quoting
message: the addressee's latest message or the one quoted), and over replies that open with a `<@U…>` mention.
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from doppel.slack.conversation import ThreadMessage, answered_message, build_conversation, reply_context
from doppel.slack.normalize import UNKNOWN_USER, addressee, message_author
from doppel.slack.reading import display_names, handles, read_text
from doppel.slack.scrub import message_regions
from doppel.slack.selection import Person, skip_reason

# Colleagues the fidelity report's classifier tells the person from, and how many messages of each.
MIN_COLLEAGUE_MESSAGES = 20
MAX_COLLEAGUES = 8
MAX_COLLEAGUE_MESSAGES = 300
# A person with no samples: colleagues of any time.
ALL_TIME = (0.0, float("inf"))
# A person's samples are their messages of at least their median length, within these bounds: the longer
# half of what they write, so that someone who mostly writes one-liners is learnt from one-liners too, not
# from their few long messages only (hyperledger's simon: median 35 characters, 6% of 100 or more).
AUTO_MIN_LENGTH = (20, 100)
# The person's memory keeps messages too short to train on ("it's in the v1.0 branch" says what they know),
# not greetings and acknowledgements ("thanks!", "ok, will do").
MEMORY_MIN_CHARS = 20
MEMORY_ANSWERED_CHARS = 400

if TYPE_CHECKING:
    from doppel.slack.samples import Manifest, ScrapeOptions, Thread


@dataclass
class _Read:
    message: Mapping[str, Any]
    text: str | None  # None: a dropped paste
    said: ThreadMessage | None  # None: nothing readable
    in_flow: bool  # posted in the channel: a root or a reply also sent to the channel
    mention_first: bool  # the raw text opens with a <@U…> mention


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
    from doppel.slack.samples import Manifest, iso, options_view, sample_order, ts_key

    users = list(users)
    names = display_names(users, threads)
    handle_ids = handles(users, names)
    bots = {u["id"] for u in users if u.get("is_bot")}
    zones = {u["id"]: u.get("tz") for u in users}
    manifest = Manifest(source=source, team=team, person=asdict(person), options=options_view(options))
    counts: dict[str, Counter[str]] = {
        k: Counter() for k in ("skipped", "dropped", "cut", "scrubbed", "own", "pairing")
    }
    oldest = ts_key(f"{options.cutoff_ts():.6f}")
    manifest.cutoff = iso(options.cutoff_ts())
    newest_own: str | None = None
    flows: dict[str, list[ThreadMessage]] = {}  # channel ID -> its channel messages, by time
    read: list[tuple[Thread, list[_Read]]] = []
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
        items: list[_Read] = []
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
            # Pastes dropped or cut are counted for the person's messages only (the reasons a run gives);
            # what is scrubbed, for every message (others' words are in the contexts).
            sink = counts if author == person.id else {**counts, "dropped": Counter(), "cut": Counter()}
            regions = message_regions(options.phone_regions, zones.get(author), zones.get(person.id))
            text = read_text(message, names, channel_names, options, sink, regions)
            raw = str(message.get("text") or "")
            said = (
                ThreadMessage(
                    author,
                    names.get(author, UNKNOWN_USER),
                    text,
                    float(message["ts"]),
                    addressee(raw, handle_ids),
                )
                if text
                else None
            )
            in_flow = message["ts"] == thread.ts or message.get("subtype") == "thread_broadcast"
            items.append(_Read(message, text, said, in_flow, raw.lstrip().startswith("<@")))
            if said and in_flow:
                flows.setdefault(thread.channel_id, []).append(said)
        read.append((thread, items))
    for flow in flows.values():
        flow.sort(key=lambda m: m.ts)
    min_length = options.min_length or options.earlier_min_length or person_min_length(read, person.id)
    manifest.options.update(min_length=min_length, min_length_given=options.min_length is not None)
    stamps = {channel: [m.ts for m in flow] for channel, flow in flows.items()}

    samples: list[dict[str, Any]] = []
    remembered: list[dict[str, Any]] = []  # the person's messages for their memory (doppel.memory.index)
    for thread, items in read:
        flow = flows.get(thread.channel_id, [])
        earlier: list[ThreadMessage] = []  # the thread so far
        for item in items:
            said = item.said
            if message_author(item.message) == person.id:
                counts["own"]["after_cutoff"] += 1
                newest_own = max([newest_own or "0", item.message["ts"]], key=ts_key)
                if item.text is None:
                    pass  # a dropped paste, counted
                elif not item.text:
                    counts["dropped"]["empty"] += 1
                elif len(item.text) < min_length:
                    counts["dropped"]["too_short"] += 1  # still remembered when long enough for memory
                if item.text and len(item.text) >= min(min_length, MEMORY_MIN_CHARS):
                    assert said is not None
                    before = flow[: bisect.bisect_left(stamps.get(thread.channel_id, []), said.ts)]
                    in_thread = item.message["ts"] != thread.ts
                    context = reply_context(
                        said,
                        before,
                        options.window_rule(),
                        thread=earlier if in_thread else None,
                        person_id=person.id,
                        budget_chars=options.budget_chars,
                    )
                    answered = answered_message([*before, *(earlier if in_thread else [])], said)
                    remembered.append(_memory_entry(thread, item, said, answered, context, person.id, team))
                    if len(item.text) >= min_length:
                        samples.append(_sample(thread, item, said, context, person, team, options))
                        _count_pairing(counts["pairing"], samples[-1], said, before, earlier, in_thread, item)
            if said:
                earlier.append(said)
    samples.sort(key=sample_order)
    if len(samples) > options.max_samples:
        counts["dropped"]["over_max_samples"] += len(samples) - options.max_samples
        samples = samples[len(samples) - options.max_samples :]
    manifest.skipped = dict(sorted(counts["skipped"].items()))
    manifest.dropped = dict(sorted(counts["dropped"].items()))
    manifest.cut = dict(sorted(counts["cut"].items()))
    manifest.scrubbed = dict(sorted(counts["scrubbed"].items()))
    manifest.pairing = pairing_figures(counts["pairing"])
    manifest.person_messages = {**counts["own"], "newest": iso(float(newest_own)) if newest_own else None}
    span = (float(samples[0]["meta"]["ts"]), float(samples[-1]["meta"]["ts"])) if samples else ALL_TIME
    manifest.colleague_messages = colleague_messages(read, person.id, min_length, span)
    manifest.colleagues = dict(Counter(m["name"] for m in manifest.colleague_messages).most_common())
    manifest.memory_entries = remembered
    return samples, manifest


def person_min_length(read: Sequence[tuple[Thread, list[_Read]]], person_id: str) -> int:
    """The shortest message of the person that makes a sample when none is given: the median length of
    their messages after the cutoff, within `AUTO_MIN_LENGTH`."""
    lengths = [
        len(item.text)
        for _, items in read
        for item in items
        if item.text and message_author(item.message) == person_id
    ]
    low, high = AUTO_MIN_LENGTH
    return min(high, max(low, int(statistics.median(lengths)))) if lengths else high


def colleague_messages(
    read: Sequence[tuple[Thread, list[_Read]]],
    person_id: str,
    min_length: int,
    span: tuple[float, float],
) -> list[dict[str, Any]]:
    """The messages of the most active other people, as long as the person's samples must be (so length
    alone tells nobody apart): the `MAX_COLLEAGUES` with at least `MIN_COLLEAGUE_MESSAGES`, each's
    `MAX_COLLEAGUE_MESSAGES` spread evenly over the time the person's samples span, oldest first. Authors
    are message user IDs, never names read from text.

    `span` is the time of the person's oldest and newest sample kept, so the report's classifier has
    colleagues on both sides of its held-out cut, which falls among the person's samples: someone who
    stopped writing long before the export ends gets colleagues of their own time, and someone whose samples
    are many weeks' worth gets colleagues of all those weeks, not only of the last few (an active colleague's
    latest 300 messages can all be after the cut)."""
    since, until = span
    by_author: dict[str, list[dict[str, Any]]] = {}
    for _, items in read:
        for item in items:
            said = item.said
            if (
                said
                and said.author_id != person_id
                and len(said.text) >= min_length
                and since <= float(item.message["ts"]) <= until
            ):
                by_author.setdefault(said.author_id, []).append(
                    {
                        "user": said.author_id,
                        "name": said.author_name,
                        "ts": item.message["ts"],
                        "text": said.text,
                    }
                )
    active = sorted(
        (a for a in by_author.values() if len(a) >= MIN_COLLEAGUE_MESSAGES), key=len, reverse=True
    )
    chosen = [m for author in active[:MAX_COLLEAGUES] for m in _spread(author, MAX_COLLEAGUE_MESSAGES)]
    return sorted(chosen, key=lambda m: float(m["ts"]))


def _spread(messages: Sequence[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """At most `most` of `messages`, evenly spaced in time order, the latest always among them."""
    ordered = sorted(messages, key=lambda m: float(m["ts"]))
    if len(ordered) <= most:
        return ordered
    step = len(ordered) / most
    return [ordered[len(ordered) - 1 - int(i * step)] for i in reversed(range(most))]


def _sample(
    thread: Thread,
    item: _Read,
    said: ThreadMessage,
    context: Sequence[ThreadMessage],
    person: Person,
    team: str,
    options: ScrapeOptions,
) -> dict[str, Any]:
    messages = build_conversation(
        person.name,
        person.id,
        context,
        said.text,
        channel=thread.channel_name,
        budget_chars=options.budget_chars,
    )
    kind = "reply" if any(m.author_id != person.id for m in context) else "opener"
    meta: dict[str, Any] = {
        "team": team,
        "channel": thread.channel_name,
        "channel_id": thread.channel_id,
        "thread_ts": thread.ts,
        "ts": item.message["ts"],
        "user": person.id,
        "person": person.name,
        "kind": kind,
        "context_ts": f"{min([said.ts, *(m.ts for m in context)]):.6f}",
    }
    offset = len(messages[-1]["content"]) - len(said.text)
    if offset:
        meta["reply_offset"] = offset
    if item.message.get("subtype"):
        meta["subtype"] = item.message["subtype"]
    return {"messages": messages, "meta": meta}


def _memory_entry(
    thread: Thread,
    item: _Read,
    said: ThreadMessage,
    answered: ThreadMessage | None,
    context: Sequence[ThreadMessage],
    person_id: str,
    team: str,
) -> dict[str, Any]:
    """The person's message as their memory keeps it (`doppel.memory.index.Entry`'s fields): what they
    wrote, where, and the message it answered: the one it explicitly answers (`answered_message`, the rule
    its sample's context and the manifest's `pairing` use: "<@bob> ..." or "bob: ..." answers Bob's latest),
    else the latest of someone else in its context, as its training sample's last user line reads."""
    answered = answered or next((m for m in reversed(context) if m.author_id != person_id), None)
    return {
        "text": said.text,
        "channel": thread.channel_name,
        "channel_id": thread.channel_id,
        "ts": item.message["ts"],
        "thread_ts": thread.ts,
        "team": team,
        "answered": f"{answered.author_name}: {answered.text}"[:MEMORY_ANSWERED_CHARS] if answered else "",
    }


def _count_pairing(
    counts: Counter[str],
    sample: Mapping[str, Any],
    said: ThreadMessage,
    before: Sequence[ThreadMessage],
    earlier: Sequence[ThreadMessage],
    in_thread: bool,
    item: _Read,
) -> None:
    """Tally whether the message `said` answers made it into its sample (see the module doc)."""
    if sample["meta"]["kind"] != "reply":
        counts["openers"] += 1
        return
    counts["replies"] += 1
    answered = answered_message([*before, *(earlier if in_thread else [])], said)
    if answered is None and in_thread:
        answered = next((m for m in reversed(earlier) if m.author_id != said.author_id), None)
    if answered is None:
        counts["mention_unanswerable"] += item.mention_first and bool(said.addressee)
        return
    shown = "\n".join(m["content"] for m in sample["messages"][1:-1])
    found = answered.text[-60:] in shown
    counts["known"] += 1
    counts["known_in_sample"] += found
    if item.mention_first and said.addressee:
        counts["mention"] += 1
        counts["mention_in_sample"] += found


def pairing_figures(counts: Mapping[str, int]) -> dict[str, Any]:
    """The manifest's `pairing`: counts and the two shares (None when nothing to measure)."""

    def share(part: str, whole: str) -> float | None:
        return round(counts.get(part, 0) / counts[whole], 4) if counts.get(whole) else None

    return {
        "replies": counts.get("replies", 0),
        "openers": counts.get("openers", 0),
        "answered_known": counts.get("known", 0),
        "answered_in_sample": share("known_in_sample", "known"),
        "mention_replies": counts.get("mention", 0),
        "mention_in_sample": share("mention_in_sample", "mention"),
        # Replies opening with a mention of someone who had said nothing before them there.
        "mention_unanswerable": counts.get("mention_unanswerable", 0),
    }
