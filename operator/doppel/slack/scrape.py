"""Scrape a person's messages through the Slack Web API (`doppel scrape --token ...`).

Channels are scraped concurrently (at most `max_concurrency` at a time) with one `AsyncWebClient`. Slack
limits each method per workspace, and by how much depends on the kind of app (see `doppel.slack.ratelimit`):
every call first takes its turn from a per-method `Budget` shared by all tasks (and, with `budget_dir`, by
every scrape of the same workspace), which starts from the configured profile and learns from each 429 how
far apart Slack wants the calls. A 429 is waited out and retried for as long as Slack keeps answering;
slack_sdk's retry handlers retry 5xx answers and dropped connections.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.web.async_client import AsyncWebClient

from doppel.errors import BadInput
from doppel.fsutil import atomic_write_text
from doppel.slack.ratelimit import DEFAULT_PROFILE, PROFILES, Budget
from doppel.slack.samples import (
    MANIFEST_FILE,
    SAMPLES_FILE,
    SECONDS_PER_DAY,
    Manifest,
    Person,
    ScrapeOptions,
    Thread,
    build_samples,
    list_channels,
    read_samples,
    resolve_person,
    select_channels,
    threads_from_messages,
    ts_key,
    write_output,
)

STATE_VERSION = 1
TOKEN_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
# Answers about one channel (or one of its pages): that channel is skipped, the run goes on.
CHANNEL_ERRORS = {
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "channel_is_limited_access",
    "invalid_cursor",
    "method_not_supported_for_channel_type",
    "invalid_ts_oldest",
    "invalid_ts_latest",
}
CHANNEL_REASONS = {
    "channel_not_found": "the channel is gone",
    "not_in_channel": "the bot is not (or no longer) in the channel",
    "is_archived": "the channel is archived",
    "channel_is_limited_access": "the channel's access is limited",
    "invalid_cursor": "Slack refused a page cursor",
    "method_not_supported_for_channel_type": "the bot cannot join this kind of channel; invite it",
}
Progress = Callable[[dict[str, Any]], None]


@dataclass
class ApiSettings:
    """How to talk to Slack: where, how fast, how persistently."""

    base_url: str = AsyncWebClient.BASE_URL
    max_concurrency: int = 4
    rate_profile: str = DEFAULT_PROFILE  # internal | marketplace | non-marketplace: the starting allowances
    rate_scale: float = 1.0  # time compression (emulators): allowances times it, Retry-After divided by it
    max_retries: int = 3  # of a 5xx answer or a dropped connection (429s are waited out, not counted)
    retry_backoff: float = 0.5  # seconds before the first retry of a 5xx or dropped connection
    timeout: float = 30
    state_path: Path | None = None  # default OUT/state.json
    rescan_days: float = 14  # re-check recorded threads active this recently for late replies; 0: never
    budget_dir: Path | None = None  # share the rate budget through DIR/<team>.json (shared volume)
    progress: Progress | None = None  # told {"event": "scrape", ...} as the scrape goes


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


class _ChannelFailed(Exception):
    """Slack answered an error about one channel: skip it."""

    def __init__(self, error: str, method: str) -> None:
        super().__init__(f"{CHANNEL_REASONS.get(error, 'Slack refused ' + method)} ({error})")


class _Scraper:
    def __init__(self, token: str, settings: ApiSettings) -> None:
        self.settings = settings
        self.budget = Budget(PROFILES[settings.rate_profile], settings.rate_scale, on_wait=self._waiting)
        self.limited = 0  # 429s answered
        self.messages = 0  # messages fetched so far
        self.channels_total = 0
        self.channels_done = 0
        self.person_id = ""
        self._wait_until = 0.0
        self._wait_method = ""
        backoff = BackoffRetryIntervalCalculator(backoff_factor=settings.retry_backoff)
        handlers: list[AsyncRetryHandler] = [
            AsyncConnectionErrorRetryHandler(
                max_retry_count=settings.max_retries, interval_calculator=backoff
            ),
            AsyncServerErrorRetryHandler(max_retry_count=settings.max_retries, interval_calculator=backoff),
        ]
        self.session = aiohttp.ClientSession()
        base_url = settings.base_url if settings.base_url.endswith("/") else settings.base_url + "/"
        self.client = AsyncWebClient(
            token=token,
            base_url=base_url,
            timeout=int(settings.timeout),
            session=self.session,
            retry_handlers=handlers,
        )

    async def close(self) -> None:
        await self.session.close()

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
            "rate_limited": self.limited,
            "wait_s": round(wait, 1),
            **({"waiting_on": self._wait_method} if wait else {}),
        }
        self.settings.progress(event)

    async def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """One API call in its turn, 429s waited out; Slack's failures become BadInput or SlackUnavailable
        with the reason, or _ChannelFailed for an answer about one channel."""
        while True:
            sent = await self.budget.turn(method)
            try:
                response = await getattr(self.client, method.replace(".", "_"))(**kwargs)
            except SlackApiError as exc:
                if exc.response.status_code == 429:
                    self.limited += 1
                    self.budget.refused(method, sent, _retry_after(exc.response.headers))
                    continue
                error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
                if exc.response.status_code == 200 and error == "thread_not_found":
                    raise _ThreadGone from None
                if exc.response.status_code == 200 and error in CHANNEL_ERRORS and "channel" in kwargs:
                    raise _ChannelFailed(str(error), method) from None
                raise _explain(method, kwargs, exc, self.settings) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise SlackUnavailable(
                    f"cannot reach Slack at {self.settings.base_url} ({type(exc).__name__}: {exc})"
                ) from None
            self.budget.accepted(method, sent)
            return dict(response.data)  # type: ignore[arg-type]

    async def pages(self, method: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Every item of a cursor-paginated method."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            data = await self.call(
                method,
                limit=self.budget.page_size(method),
                **kwargs,
                **({"cursor": cursor} if cursor else {}),
            )
            items += data.get(key, [])
            cursor = (data.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return items

    async def run(self, user: str, out: Path, options: ScrapeOptions) -> Manifest:
        auth = await self.call("auth.test")
        team = str(auth["team_id"])
        if options.team and options.team != team:
            raise BadInput(f"the token belongs to team {team}, not {options.team}")
        if self.settings.budget_dir is not None:
            self.budget.share(Path(self.settings.budget_dir) / f"{team}.json")
        options = replace(options, bot_user_id=options.bot_user_id or auth.get("user_id"))
        users = await self.pages("users.list", "members")
        person = resolve_person(users, user)
        self.person_id = person.id
        types = "public_channel,private_channel" if options.channels else "public_channel"
        channels = await self.pages(
            "conversations.list", "channels", types=types, exclude_archived=not options.channels
        )
        chosen = select_channels(channels, options)
        state_path = self.settings.state_path or out / "state.json"
        state = _load_state(state_path, team, person.id)
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
            _save_state(state_path, team, person.id, state)

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
                except _ChannelFailed as exc:
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
            await self.call("conversations.join", channel=channel_id)
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
                    newer = await self.pages(
                        "conversations.replies", "messages", channel=channel_id, ts=root, oldest=last_seen
                    )
                except _ThreadGone:
                    partial["seen"][root] = ""  # deleted since: forget it
                    continue
                replies = [m for m in newer if m["ts"] != root and ts_key(m["ts"]) > ts_key(last_seen)]
                if any(m.get("user") == self.person_id for m in replies):
                    await self._thread(channel_id, root, partial)
                elif replies:  # only others replied: no sample there, nothing to fetch
                    partial["seen"][root] = max((m["ts"] for m in replies), key=ts_key)
            if partial["seen"]:
                checkpoint(_entry(channel, since, recorded, partial, cutoff))
        oldest = partial["oldest"]
        while True:
            below = partial["below"]
            data = await self.call(
                "conversations.history",
                channel=channel_id,
                oldest=oldest,
                limit=self.budget.page_size("conversations.history"),
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
            checkpoint(_entry(channel, since, recorded, partial, cutoff))
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
            thread = await self.pages("conversations.replies", "messages", channel=channel_id, ts=root)
        except _ThreadGone:
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


def _entry(
    channel: Mapping[str, Any],
    since: str | None,
    recorded: Mapping[str, str],
    partial: dict[str, Any],
    cutoff: float,
) -> dict[str, Any]:
    """A channel's state entry while a pass is under way: the last finished pass's figures plus it."""
    return {
        "name": channel["name"],
        "latest": since or "",
        "threads": recorded_threads(recorded, cutoff),
        "partial": partial,
    }


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
        self._before = {_key(s) for s in read_samples(out / SAMPLES_FILE)}
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


def _retry_after(headers: Mapping[str, Any]) -> float:
    """Slack's Retry-After (seconds; 1 when absent or unreadable)."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), "1")
    if isinstance(value, list):
        value = value[0] if value else "1"
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 1.0


class _ThreadGone(Exception):
    """conversations.replies answered thread_not_found: the thread's root was deleted."""


def threads_to_recheck(
    recorded: Mapping[str, str], listed_from: str, rescan_from: float | None
) -> dict[str, str]:
    """Recorded threads (root ts -> latest reply ts) that may have replies the history call will not
    show: started at or before `listed_from` (so not in this run's history) and active after
    `rescan_from` (None: none)."""
    if rescan_from is None:
        return {}
    window = ts_key(f"{rescan_from:.6f}")
    return {
        root: last
        for root, last in recorded.items()
        if ts_key(root) <= ts_key(listed_from) and ts_key(last) > window
    }


def recorded_threads(threads: Mapping[str, str], cutoff: float) -> dict[str, str]:
    """The threads worth recording: those started after the cutoff (older ones are never sampled) and
    not gone (""), sorted by root ts so that the state file is deterministic."""
    limit = ts_key(f"{cutoff:.6f}")
    kept = [(root, last) for root, last in threads.items() if last and ts_key(root) > limit]
    return dict(sorted(kept, key=lambda item: ts_key(item[0])))


class SlackUnavailable(Exception):
    """Slack cannot be reached or keeps failing after the retries: transient, not the input's fault (the
    operator tries again later; bad input would fail at once)."""


def _explain(
    method: str, kwargs: Mapping[str, Any], exc: SlackApiError, settings: ApiSettings
) -> BadInput | SlackUnavailable:
    """A one-line reason for a failed call."""
    status = exc.response.status_code
    error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
    where = f" in channel {kwargs['channel']}" if "channel" in kwargs else ""
    if error in TOKEN_ERRORS:
        return BadInput(f"Slack rejected the token ({error})")
    if error == "missing_scope":
        needed, provided = exc.response.get("needed"), exc.response.get("provided")
        granted = f" (granted: {provided})" if provided else ""
        return BadInput(f"the token lacks the scope {needed} needed by {method}{granted}; reinstall the app")
    if status >= 500:
        return SlackUnavailable(
            f"Slack kept failing (HTTP {status} on {method}) after {settings.max_retries} retries; try later"
        )
    return BadInput(f"Slack refused {method}{where}: {error or f'HTTP {status}'}")


def _first_bad_input(group: BaseExceptionGroup) -> BaseException:
    """The first BadInput of a failed task group; anything else is re-raised as it was."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_bad_input(exc)
        if isinstance(exc, BadInput):
            return exc
    return group.exceptions[0]


def _load_state(path: Path, team: str, person: str) -> dict[str, dict[str, Any]]:
    """Per-channel progress of earlier runs for this team and person."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path} is not a scrape state file ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise BadInput(f"{path} is not a scrape state file (version {STATE_VERSION})")
    if (data.get("team"), data.get("person")) != (team, person):
        raise BadInput(
            f"{path} records a scrape of {data.get('person')} in {data.get('team')}; use another --state"
        )
    channels = data.get("channels", {})
    if not isinstance(channels, dict) or not all(_valid_channel_state(c) for c in channels.values()):
        raise BadInput(f"{path} is not a scrape state file (malformed channels)")
    return dict(channels)


def _valid_channel_state(entry: Any) -> bool:
    threads = entry.get("threads", {}) if isinstance(entry, dict) else None
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("latest"), str)
        and isinstance(threads, dict)
        and all(isinstance(k, str) and isinstance(v, str) and v for k, v in threads.items())
        and ("partial" not in entry or _valid_partial(entry["partial"]))
    )


def _valid_partial(partial: Any) -> bool:
    """A pass under way: its lower bound, how far down it got, the newest ts seen, what it fetched."""
    return (
        isinstance(partial, dict)
        and isinstance(partial.get("oldest"), str)
        and all(isinstance(partial.get(k), str | None) for k in ("below", "newest"))
        and isinstance(partial.get("messages"), list)
        and all(isinstance(m, dict) and isinstance(m.get("ts"), str) for m in partial["messages"])
        and isinstance(partial.get("seen"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in partial["seen"].items())
    )


def _save_state(path: Path, team: str, person: str, channels: dict[str, dict[str, Any]]) -> None:
    data = {"version": STATE_VERSION, "team": team, "person": person, "channels": channels}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
