"""Scrape a person's messages through the Slack Web API (`doppel scrape --token ...`).

Channels are scraped concurrently (at most `max_concurrency` at a time) with one `AsyncWebClient`. Slack
limits each method per workspace ("tiers"), so every call first takes its turn from a per-method schedule
shared by all tasks, spaced a little under the documented limit; a 429 still pushes that method's schedule
back by `Retry-After` for every task, so a rate limit never turns into a storm of retries. slack_sdk's retry
handlers retry 429s, 5xx answers and dropped connections.

Incremental: a state file records, per channel, the newest top-level message fetched and the threads seen
with their latest reply (those started within the cutoff). Asking conversations.history only for newer
top-level messages would miss replies posted since to older threads, and Slack has no "threads updated
since" call. So the next run re-lists the last `rescan_days` of top-level messages (a page holds 200
parents, each with its `latest_reply`), re-checks each recorded thread started before that but active
within it with conversations.replies from its recorded latest reply, and fetches in full (the context of
the new replies) only the threads that are new or changed. Samples are merged into the earlier ones
without duplicates.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from doppel.errors import BadInput
from doppel.fsutil import atomic_write_text
from doppel.slack.samples import (
    SECONDS_PER_DAY,
    Manifest,
    ScrapeOptions,
    Thread,
    build_samples,
    list_channels,
    resolve_person,
    select_channels,
    threads_from_messages,
    ts_key,
    write_output,
)

# Slack's documented per-minute limits of the methods used (Tier 2: 20, Tier 3: 50, Tier 4: 100).
PER_MINUTE = {
    "auth.test": 100,
    "users.list": 20,
    "conversations.list": 20,
    "conversations.join": 50,
    "conversations.history": 50,
    "conversations.replies": 50,
}
# Spacing calls at the limit exactly invites 429s from clock jitter; stay a little under it.
HEADROOM = 0.95
PAGE_SIZE = 200
STATE_VERSION = 1
TOKEN_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}


@dataclass
class ApiSettings:
    """How to talk to Slack: where, how fast, how persistently."""

    base_url: str = AsyncWebClient.BASE_URL
    max_concurrency: int = 4
    rate_scale: float = 1.0  # multiplies the documented limits (raised limits, emulators)
    max_retries: int = 3
    retry_backoff: float = 0.5  # seconds before the first retry of a 5xx or dropped connection
    timeout: float = 30
    state_path: Path | None = None  # default OUT/state.json
    rescan_days: float = 14  # re-check recorded threads active this recently for late replies; 0: never


class RateSchedule:
    """Per-method call schedule shared by every task: one slot every 60/limit seconds."""

    def __init__(self, rate_scale: float) -> None:
        self._scale = rate_scale
        self._next: dict[str, float] = {}

    async def wait_turn(self, method: str) -> None:
        loop = asyncio.get_running_loop()
        interval = 60 / (PER_MINUTE[method] * self._scale * HEADROOM)
        now = loop.time()
        slot = max(now, self._next.get(method, now))
        self._next[method] = slot + interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def push_back(self, method: str, seconds: float) -> None:
        """Nobody calls `method` for `seconds` (Slack said so with Retry-After)."""
        now = asyncio.get_running_loop().time()
        self._next[method] = max(self._next.get(method, now), now + seconds)


class _SharedRateLimitHandler(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's 429 handler (sleeps Retry-After), also pushing back the method for every task."""

    def __init__(self, schedule: RateSchedule, max_retry_count: int) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self._schedule = schedule

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        if response is not None:
            method = request.url.rstrip("/").rsplit("/", 1)[-1]
            if method in PER_MINUTE:
                retry_after = next(
                    (v for k, v in response.headers.items() if k.lower() == "retry-after"), ["1"]
                )
                self._schedule.push_back(method, float(retry_after[0]))
        await super().prepare_for_next_attempt_async(
            state=state, request=request, response=response, error=error
        )


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
    out = Path(out)
    scraper = _Scraper(token, settings)
    try:
        return await scraper.run(user, out, options)
    finally:
        await scraper.close()


class _Scraper:
    def __init__(self, token: str, settings: ApiSettings) -> None:
        self.settings = settings
        self.schedule = RateSchedule(settings.rate_scale)
        backoff = BackoffRetryIntervalCalculator(backoff_factor=settings.retry_backoff)
        handlers: list[AsyncRetryHandler] = [
            AsyncConnectionErrorRetryHandler(
                max_retry_count=settings.max_retries, interval_calculator=backoff
            ),
            _SharedRateLimitHandler(self.schedule, settings.max_retries),
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

    async def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """One API call in its turn; failures become BadInput or SlackUnavailable, with the reason."""
        await self.schedule.wait_turn(method)
        try:
            response = await getattr(self.client, method.replace(".", "_"))(**kwargs)
        except SlackApiError as exc:
            if exc.response.status_code == 200 and exc.response.get("error") == "thread_not_found":
                raise _ThreadGone from None
            raise _explain(method, kwargs, exc, self.settings) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SlackUnavailable(
                f"cannot reach Slack at {self.settings.base_url} ({type(exc).__name__}: {exc})"
            ) from None
        return dict(response.data)  # type: ignore[arg-type]

    async def pages(self, method: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Every item of a cursor-paginated method."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            data = await self.call(
                method, limit=PAGE_SIZE, **kwargs, **({"cursor": cursor} if cursor else {})
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
        options = replace(options, bot_user_id=options.bot_user_id or auth.get("user_id"))
        users = await self.pages("users.list", "members")
        person = resolve_person(users, user)
        types = "public_channel,private_channel" if options.channels else "public_channel"
        channels = await self.pages(
            "conversations.list", "channels", types=types, exclude_archived=not options.channels
        )
        chosen = select_channels(channels, options)
        state_path = self.settings.state_path or out / "state.json"
        state = _load_state(state_path, team, person.id)
        cutoff = options.cutoff_ts()
        now = options.now if options.now is not None else time.time()
        # A rescan window reaching before the cutoff would only re-check threads that are ignored anyway.
        rescan_from = max(cutoff, now - self.settings.rescan_days * SECONDS_PER_DAY)
        rescan = self.settings.rescan_days > 0
        semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        results: dict[str, tuple[list[Thread], str | None, dict[str, str]]] = {}

        async def one(channel: Mapping[str, Any]) -> None:
            async with semaphore:
                earlier = state.get(channel["id"], {})
                results[channel["id"]] = await self.channel(
                    channel,
                    cutoff,
                    earlier.get("latest"),
                    earlier.get("threads", {}),
                    rescan_from if rescan else None,
                )

        try:
            async with asyncio.TaskGroup() as group:
                for channel in chosen:
                    group.create_task(one(channel))
        except ExceptionGroup as failures:
            raise _first_bad_input(failures) from None
        threads = [t for c in chosen for t in results[c["id"]][0]]
        channel_names = {c["id"]: c["name"] for c in channels}
        samples, manifest = build_samples(
            threads, person, users, channel_names, options, team=team, source="api"
        )
        list_channels(manifest, channels, options)
        manifest = write_output(out, samples, manifest, options.max_samples)
        for channel in chosen:
            _, latest, seen = results[channel["id"]]
            if latest:
                recorded = {**state.get(channel["id"], {}).get("threads", {}), **seen}
                state[channel["id"]] = {
                    "name": channel["name"],
                    "latest": latest,
                    "threads": recorded_threads(recorded, cutoff),
                }
        # Written last: if anything above failed, the next run fetches the same messages again.
        _save_state(state_path, team, person.id, state)
        return manifest

    async def channel(
        self,
        channel: Mapping[str, Any],
        cutoff: float,
        since: str | None,
        recorded: Mapping[str, str],
        rescan_from: float | None,
    ) -> tuple[list[Thread], str | None, dict[str, str]]:
        """One channel's messages newer than `since` (all after the cutoff on a first run) and the threads
        new or changed since they were `recorded` (root ts -> latest reply ts), looking for changes in
        threads active after `rescan_from` (None: not looking). Returns those threads, the newest
        top-level ts, and the latest reply of each thread fetched, or "" for a recorded one now gone."""
        if not channel.get("is_member"):
            await self.call("conversations.join", channel=channel["id"])
        oldest = f"{cutoff:.6f}"
        start = since
        if since and rescan_from is not None:
            start = min(since, f"{rescan_from:.6f}", key=ts_key)
        if start and ts_key(start) > ts_key(oldest):
            oldest = start
        history = await self.pages("conversations.history", "messages", channel=channel["id"], oldest=oldest)
        # Top-level messages at or before `since` were taken last time; they are listed again to read their
        # threads' latest_reply, and kept as the channel window before the newer ones (their own samples
        # are already written: the merge keeps those).
        messages = list(history)
        parents = {
            m["ts"]: m.get("latest_reply", "")
            for m in history
            if m.get("reply_count") and m.get("thread_ts") == m.get("ts")
        }
        roots = [root for root, last in parents.items() if recorded.get(root) != last]
        listed = {m["ts"] for m in history}
        seen = {root: "" for root in recorded if ts_key(root) > ts_key(oldest) and root not in listed}
        for root, last_seen in threads_to_recheck(recorded, oldest, rescan_from).items():
            try:
                # Usually just the root comes back: cheap. Any reply means the whole thread is needed,
                # since a sample's context is every message before it.
                newer = await self.pages(
                    "conversations.replies", "messages", channel=channel["id"], ts=root, oldest=last_seen
                )
            except _ThreadGone:
                seen[root] = ""  # deleted since: forget it
                continue
            if any(m["ts"] != root and ts_key(m["ts"]) > ts_key(last_seen) for m in newer):
                roots.append(root)
        for root in roots:
            try:
                thread = await self.pages("conversations.replies", "messages", channel=channel["id"], ts=root)
            except _ThreadGone:
                seen[root] = ""
                continue
            messages += thread
            seen[root] = max((m["ts"] for m in thread), key=ts_key, default=root)
        # Never backwards (the newest message may have been deleted since).
        latest = max([m["ts"] for m in history] + ([since] if since else []), key=ts_key, default=None)
        threads = threads_from_messages(channel["id"], channel["name"], messages, cutoff)
        return threads, latest, seen


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
        needed = exc.response.get("needed")
        return BadInput(f"the token lacks the scope {needed} needed by {method}")
    if error == "channel_not_found":
        return BadInput(f"channel {kwargs.get('channel')} vanished during the scrape (channel_not_found)")
    if status == 429:
        return SlackUnavailable(
            f"Slack kept rate-limiting {method} after {settings.max_retries} retries; try later"
        )
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
    )


def _save_state(path: Path, team: str, person: str, channels: dict[str, dict[str, Any]]) -> None:
    data = {"version": STATE_VERSION, "team": team, "person": person, "channels": channels}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
