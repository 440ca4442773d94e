"""Scrape a person's messages through the Slack Web API (`doppel scrape --token ...`).

Channels are scraped concurrently (at most `max_concurrency` at a time) through one `WebApi` (webapi.py:
the calls in their turn of the workspace's rate budget, paging, 429s waited out, Slack's errors explained).
This module walks the channels and their threads and writes the output; the state file is scrape_state.py's.

One channel's failure (archived, the bot removed, gone, limited access, a stale cursor) skips that channel,
with the reason in the manifest and on stderr; only workspace-wide problems (the token, a missing scope,
Slack unreachable) stop the run, as `BadInput`.

Checkpoints: each finished channel's samples are merged into OUT/samples.jsonl and its progress into the
state file at once, and a channel still in progress records after each page of history (with the threads
that page lists) how far down it got and what it fetched, so a killed or failed run resumes where it
stopped, fetching again at most the page it was on.

Incremental: the state file records, per channel, the newest top-level message fetched and the threads seen
with their latest reply (those started within the cutoff). Asking conversations.history only for newer
top-level messages would miss replies posted since to older threads, and Slack has no "threads updated
since" call. So the next run re-lists the last `rescan_days` of top-level messages (each parent carries its
`latest_reply`), re-checks each recorded thread started before that but active within it with
conversations.replies from its recorded latest reply, and fetches in full (the context of the new replies)
only the threads that are new or changed, and among those only the ones the person replied in (Slack lists
the repliers with each parent): one call a thread is most of a scrape's cost. Samples are merged into the
earlier ones without duplicates.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from doppel.errors import BadInput
from doppel.fsutil import atomic_write_text
from doppel.slack.ratelimit import PROFILES
from doppel.slack.samples import (
    MANIFEST_FILE,
    SAMPLES_FILE,
    SECONDS_PER_DAY,
    Manifest,
    Person,
    ScrapeOptions,
    Thread,
    build_samples,
    chosen_min_length,
    list_channels,
    read_samples,
    resolve_person,
    scrub_changed,
    select_channels,
    threads_from_messages,
    ts_key,
    write_output,
)
from doppel.slack.scrape_state import (
    load_state,
    partial_entry,
    recorded_threads,
    save_state,
    threads_to_recheck,
)
from doppel.slack.webapi import ApiSettings, ChannelFailed, ThreadGone, WebApi


def scrape_api(
    token: str,
    user: str,
    out: Path,
    options: ScrapeOptions | None = None,
    settings: ApiSettings | None = None,
) -> Manifest:
    """Scrape `user`'s messages with a bot token and write OUT/samples.jsonl and OUT/manifest.json."""
    return asyncio.run(scrape_api_async(token, user, out, options, settings))


async def scrape_api_async(
    token: str,
    user: str,
    out: Path,
    options: ScrapeOptions | None = None,
    settings: ApiSettings | None = None,
) -> Manifest:
    options = options or ScrapeOptions()
    settings = settings or ApiSettings()
    if not token:
        raise BadInput("no Slack token: pass --token or set SLACK_BOT_TOKEN")
    if settings.rate_profile not in PROFILES:
        raise BadInput(f"unknown rate profile {settings.rate_profile!r}; one of {', '.join(PROFILES)}")
    out = Path(out)
    scraper = _Scraper(token, settings)
    try:
        return await scraper.run(user, out, options)
    finally:
        await scraper.close()


class _Scraper:
    """One run: the channels walked concurrently over one `WebApi`, with the counts `report` tells."""

    def __init__(self, token: str, settings: ApiSettings) -> None:
        self.settings = settings
        self.api = WebApi(token, settings, on_wait=self._waiting)
        self.messages = 0  # messages fetched so far
        self.channels_total = 0
        self.channels_done = 0
        self.person_id = ""
        self._wait_until = 0.0
        self._wait_method = ""

    async def close(self) -> None:
        await self.api.close()

    def _waiting(self, method: str, seconds: float) -> None:
        until = time.time() + seconds
        if until > self._wait_until + 1:
            self._wait_until, self._wait_method = until, method
            self.report()

    def report(self) -> None:
        """Tell `settings.progress` how far the scrape is (a --json-progress line)."""
        if self.settings.progress is None:
            return
        wait = max(0.0, self._wait_until - time.time())
        event = {
            "event": "scrape",
            "channels_done": self.channels_done,
            "channels_total": self.channels_total,
            "messages": self.messages,
            "rate_limited": self.api.limited,
            "wait_s": round(wait, 1),
            **({"waiting_on": self._wait_method} if wait else {}),
        }
        self.settings.progress(event)

    async def run(self, user: str, out: Path, options: ScrapeOptions) -> Manifest:
        auth = await self.api.call("auth.test")
        team = str(auth["team_id"])
        if options.team and options.team != team:
            raise BadInput(f"the token belongs to team {team}, not {options.team}")
        if self.settings.budget_dir is not None:
            self.api.budget.share(Path(self.settings.budget_dir) / f"{team}.json")
        options = replace(options, bot_user_id=options.bot_user_id or auth.get("user_id"))
        users = await self.api.pages("users.list", "members")
        person = resolve_person(users, user)
        self.person_id = person.id
        # Private channels are listed only when they may be taken: listing them needs `groups:read`.
        private = bool(options.channels) or options.include_private
        types = "public_channel,private_channel" if private else "public_channel"
        channels = await self.api.pages(
            "conversations.list", "channels", types=types, exclude_archived=not options.channels
        )
        chosen = select_channels(channels, options)
        state_path = self.settings.state_path or out / "state.json"
        # Scrubbed otherwise than before: every thread is read again (`scrub_changed`).
        fresh = scrub_changed(out, options.scrub)
        state = {} if fresh else load_state(state_path, team, person.id)
        if state and options.min_length is None:
            options = replace(options, earlier_min_length=chosen_min_length(out))
        output = _Output(out, person, users, channels, options, team)
        cutoff = max(0.0, options.cutoff_ts())  # Slack takes no negative timestamps (invalid_ts_oldest)
        now = options.now if options.now is not None else time.time()
        # A rescan window reaching before the cutoff would only re-check threads that are ignored anyway.
        rescan_from = max(cutoff, now - self.settings.rescan_days * SECONDS_PER_DAY)
        rescan = self.settings.rescan_days > 0
        semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        self.channels_total = len(chosen)
        self.report()

        def checkpoint(channel_id: str, entry: dict[str, Any]) -> None:
            if entry.get("latest") or entry.get("threads") or entry.get("partial"):
                state[channel_id] = copy.deepcopy(entry)  # a snapshot: the pass goes on changing it
            else:
                state.pop(channel_id, None)
            save_state(state_path, team, person.id, state)

        async def one(channel: Mapping[str, Any]) -> None:
            async with semaphore:
                try:
                    threads, entry = await self.channel(
                        channel,
                        cutoff,
                        dict(state.get(channel["id"], {})),
                        rescan_from if rescan else None,
                        lambda entry: checkpoint(channel["id"], entry),
                    )
                except ChannelFailed as exc:
                    output.skip(channel, str(exc))
                    print(f"doppel: skipped channel #{channel['name']}: {exc}", file=sys.stderr)
                else:
                    # Samples first, then the state that says they are taken: a kill in between only means
                    # fetching the channel's last page again.
                    for channel_id, done in output.finish(channel, threads, entry).items():
                        checkpoint(channel_id, done)
                self.channels_done += 1
                self.report()

        try:
            async with asyncio.TaskGroup() as group:
                for channel in chosen:
                    group.create_task(one(channel))
        except ExceptionGroup as failures:
            raise _first_bad_input(failures) from None
        if chosen and len(output.skipped) == len(chosen):
            reasons = "; ".join(f"#{name}: {why}" for name, why in sorted(output.skipped.items()))
            raise BadInput(f"no channel could be scraped ({reasons})")
        manifest = output.write()
        assert manifest is not None
        for channel_id, done in output.taken().items():
            checkpoint(channel_id, done)
        return manifest

    async def channel(
        self,
        channel: Mapping[str, Any],
        cutoff: float,
        earlier: dict[str, Any],
        rescan_from: float | None,
        checkpoint: Callable[[dict[str, Any]], None],
    ) -> tuple[list[Thread], dict[str, Any]]:
        """One channel's threads new or changed since `earlier` (its state entry: the newest top-level ts
        taken, "latest", and the threads recorded, root ts -> latest reply ts), looking for changes in
        recorded threads active after `rescan_from` (None: not looking). Resumes a pass that `earlier`
        records as unfinished ("partial"). Returns those threads and the channel's new state entry; after
        each page of history `checkpoint` is told the entry with the pass so far."""
        channel_id = channel["id"]
        since = earlier.get("latest") or None
        recorded: dict[str, str] = dict(earlier.get("threads", {}))
        partial = earlier.get("partial")
        if not channel.get("is_member"):
            await self.api.call("conversations.join", channel=channel_id)
        if partial is None:
            oldest = f"{cutoff:.6f}"
            start = since
            if since and rescan_from is not None:
                start = min(since, f"{rescan_from:.6f}", key=ts_key)
            if start and ts_key(start) > ts_key(oldest):
                oldest = start
            partial = {"oldest": oldest, "below": None, "newest": None, "messages": [], "seen": {}}
            # Recorded threads older than what history lists again: fetch those with new replies.
            for root, last_seen in threads_to_recheck(recorded, oldest, rescan_from).items():
                try:
                    # Usually just the root comes back: cheap. Any reply means the whole thread is needed,
                    # since a sample's context is every message before it.
                    newer = await self.api.pages(
                        "conversations.replies", "messages", channel=channel_id, ts=root, oldest=last_seen
                    )
                except ThreadGone:
                    partial["seen"][root] = ""  # deleted since: forget it
                    continue
                replies = [m for m in newer if m["ts"] != root and ts_key(m["ts"]) > ts_key(last_seen)]
                if any(m.get("user") == self.person_id for m in replies):
                    await self._thread(channel_id, root, partial)
                elif replies:  # only others replied: no sample there, nothing to fetch
                    partial["seen"][root] = max((m["ts"] for m in replies), key=ts_key)
            if partial["seen"]:
                checkpoint(partial_entry(channel, since, recorded, partial, cutoff))
        oldest = partial["oldest"]
        while True:
            below = partial["below"]
            data = await self.api.call(
                "conversations.history",
                channel=channel_id,
                oldest=oldest,
                limit=self.api.budget.page_size("conversations.history"),
                **({"latest": below} if below else {}),
            )
            page = data.get("messages", [])
            self.messages += len(page)
            stamps = [m["ts"] for m in page]
            lowest = min(stamps, key=ts_key) if stamps else None
            more = bool(data.get("has_more")) and lowest is not None
            # Top-level messages at or before `since` were taken last time; they are listed again to read
            # their threads' latest_reply, and kept as the channel window before the newer ones (their own
            # samples are already written: the merge keeps those).
            partial["messages"] += page
            for message in page:
                root, last = message["ts"], message.get("latest_reply", "")
                is_parent = message.get("reply_count") and message.get("thread_ts") == root
                if not is_parent or recorded.get(root) == last:
                    continue
                if _may_hold(message, self.person_id):
                    await self._thread(channel_id, root, partial)
                else:  # recorded, so that a later reply shows as a change
                    partial["seen"][root] = last
            # Recorded threads within the range this page covers that it no longer lists: deleted.
            floor = ts_key(lowest) if more and lowest else ts_key(oldest)
            ceiling = ts_key(below) if below else None
            listed = set(stamps)
            for root in recorded:
                key = ts_key(root)
                if key > floor and (ceiling is None or key < ceiling) and root not in listed:
                    partial["seen"].setdefault(root, "")
            if stamps:
                newest = max([*stamps, *([partial["newest"]] if partial["newest"] else [])], key=ts_key)
                partial["newest"] = newest
            if not more:
                break
            partial["below"] = lowest
            checkpoint(partial_entry(channel, since, recorded, partial, cutoff))
            self.report()
        # Never backwards (the newest message may have been deleted since).
        latest = max([t for t in (partial["newest"], since) if t], key=ts_key, default=None)
        threads = threads_from_messages(channel_id, channel["name"], partial["messages"], cutoff)
        entry = {
            "name": channel["name"],
            "latest": latest or "",
            "threads": recorded_threads({**recorded, **partial["seen"]}, cutoff),
        }
        return threads, entry

    async def _thread(self, channel_id: str, root: str, partial: dict[str, Any]) -> None:
        """Fetch a whole thread into the pass `partial`."""
        try:
            thread = await self.api.pages("conversations.replies", "messages", channel=channel_id, ts=root)
        except ThreadGone:
            partial["seen"][root] = ""
            return
        self.messages += len(thread)
        partial["messages"] += thread
        partial["seen"][root] = max((m["ts"] for m in thread), key=ts_key, default=root)


def _may_hold(parent: Mapping[str, Any], person: str) -> bool:
    """Whether a thread may hold a reply of `person`: Slack lists who replied (`reply_users`) with the
    parent. Only threads where the person replied need fetching (their replies are the samples; a root of
    theirs comes with the history), which under the non-Marketplace limit of one call a minute is most of
    the cost. Fetched whenever the list is missing or incomplete."""
    users, count = parent.get("reply_users"), parent.get("reply_users_count")
    if not isinstance(users, list) or not isinstance(count, int) or count > len(users):
        return True
    return person in users


class _Output:
    """The samples of the channels finished so far, merged into OUT as they finish. Writing them all again
    costs more as they grow, so a write waits until ten times as long as the last one took has passed: the
    scrape spends at most a tenth of its time on checkpoints."""

    def __init__(
        self,
        out: Path,
        person: Person,
        users: list[dict[str, Any]],
        channels: list[dict[str, Any]],
        options: ScrapeOptions,
        team: str,
    ) -> None:
        self.out, self.person, self.users, self.channels = out, person, users, channels
        self.channel_names = {c["id"]: c["name"] for c in channels}
        self.options, self.team = options, team
        self.threads: dict[str, list[Thread]] = {}  # channel name -> its threads
        self.finished: dict[str, str] = {}  # name -> id
        self.skipped: dict[str, str] = {}  # name -> reason
        earlier = [] if scrub_changed(out, options.scrub) else read_samples(out / SAMPLES_FILE)
        self._before = {_key(s) for s in earlier}
        self._pending: dict[str, dict[str, Any]] = {}  # channel id -> state entry, once its samples are out
        self._next_write = 0.0

    def finish(
        self, channel: Mapping[str, Any], threads: list[Thread], entry: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """Take a finished channel; the state entries of the channels whose samples are now written."""
        self.threads[channel["name"]] = threads
        self.finished[channel["name"]] = channel["id"]
        self._pending[channel["id"]] = entry
        if time.monotonic() < self._next_write or self.write(final=False) is None:
            return {}
        return self.taken()

    def taken(self) -> dict[str, dict[str, Any]]:
        """The state entries of the channels written since the last call."""
        taken, self._pending = self._pending, {}
        return taken

    def skip(self, channel: Mapping[str, Any], reason: str) -> None:
        self.skipped[channel["name"]] = reason

    def write(self, final: bool = True) -> Manifest | None:
        """Merge the finished channels' samples into OUT. Before the end (`final` False) nothing is written
        while there is no sample at all (None): a run without any is bad input, and leaves nothing."""
        started = time.monotonic()
        threads = [t for name in sorted(self.threads) for t in self.threads[name]]
        samples, manifest = build_samples(
            threads, self.person, self.users, self.channel_names, self.options, team=self.team, source="api"
        )
        list_channels(manifest, self.channels, self.options)
        for name, reason in self.skipped.items():
            manifest.channels[name]["skipped"] = reason
        if not final and not samples and not self._before:
            return None
        manifest = write_output(self.out, samples, manifest, self.options.max_samples)
        added = sum(1 for s in read_samples(self.out / SAMPLES_FILE) if _key(s) not in self._before)
        if added != manifest.added:  # the earlier checkpoints of this run took some of them
            manifest.added = added
            text = json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n"
            atomic_write_text(self.out / MANIFEST_FILE, text)
        ended = time.monotonic()
        self._next_write = ended + 10 * (ended - started)
        return manifest


def _key(sample: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = sample["meta"]
    return meta["team"], meta["channel_id"], meta["ts"]


def _first_bad_input(group: BaseExceptionGroup) -> BaseException:
    """The first BadInput of a failed task group; anything else is re-raised as it was."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_bad_input(exc)
        if isinstance(exc, BadInput):
            return exc
    return group.exceptions[0]
