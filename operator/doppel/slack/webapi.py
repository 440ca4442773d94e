"""Slack's Web API for the scraper: one `AsyncWebClient`, each call in its turn, pages, and Slack's
failures classified and explained.

Slack limits each method per workspace, and by how much depends on the kind of app (see
`doppel.slack.ratelimit`): every call first takes its turn from a per-method `Budget` shared by all tasks
(and, with `budget_dir`, by every scrape of the same workspace), which starts from the configured profile
and learns from each 429 how far apart Slack wants the calls. A 429 is waited out (its Retry-After) and
retried for as long as Slack keeps answering; slack_sdk's retry handlers retry 5xx answers and dropped
connections.

An answer about one channel raises `ChannelFailed` (the scraper skips that channel), a deleted thread
`ThreadGone`; workspace-wide problems (the token, a missing scope) are `BadInput`, and Slack unreachable or
failing after the retries is `SlackUnavailable`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
from doppel.slack.ratelimit import DEFAULT_PROFILE, PROFILES, Budget

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


class SlackUnavailable(Exception):
    """Slack cannot be reached or keeps failing after the retries: transient, not the input's fault (the
    operator tries again later; bad input would fail at once)."""


class ChannelFailed(Exception):
    """Slack answered an error about one channel: skip it."""

    def __init__(self, error: str, method: str) -> None:
        super().__init__(f"{CHANNEL_REASONS.get(error, 'Slack refused ' + method)} ({error})")


class ThreadGone(Exception):
    """conversations.replies answered thread_not_found: the thread's root was deleted."""


class WebApi:
    """The Web API of one workspace, as one token sees it."""

    def __init__(
        self, token: str, settings: ApiSettings, on_wait: Callable[[str, float], None] | None = None
    ) -> None:
        self.settings = settings
        self.budget = Budget(PROFILES[settings.rate_profile], settings.rate_scale, on_wait=on_wait)
        self.limited = 0  # 429s answered
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

    async def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """One API call in its turn, 429s waited out; Slack's failures become BadInput or SlackUnavailable
        with the reason, ChannelFailed for an answer about one channel."""
        while True:
            sent = await self.budget.turn(method)
            try:
                response = await getattr(self.client, method.replace(".", "_"))(**kwargs)
            except SlackApiError as exc:
                if exc.response.status_code == 429:
                    self.limited += 1
                    self.budget.refused(method, sent, retry_after(exc.response.headers))
                    continue
                error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
                if exc.response.status_code == 200 and error == "thread_not_found":
                    raise ThreadGone from None
                if exc.response.status_code == 200 and error in CHANNEL_ERRORS and "channel" in kwargs:
                    raise ChannelFailed(str(error), method) from None
                raise explain(method, kwargs, exc, self.settings) from None
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


def retry_after(headers: Mapping[str, Any]) -> float:
    """Slack's Retry-After (seconds; 1 when absent or unreadable)."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), "1")
    if isinstance(value, list):
        value = value[0] if value else "1"
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 1.0


def explain(
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
