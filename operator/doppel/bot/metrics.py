"""The bot's Prometheus metrics, fed by one-line calls from the app, the worker and the HTTP server.

Workspaces label the event and reply counters only (one series per workspace and kind: a bounded number
for one Slack app); latencies and errors carry no workspace, to keep their series few.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from slack_sdk.errors import SlackApiError, SlackClientError

from doppel.metrics import Exporter
from doppel.serve.errors import ServeError

ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, float("inf"))  # Slack allows 3 s
REPLY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, float("inf"))
# Mentions whose first reply is remembered (to time only the first one); older ones are forgotten.
REMEMBERED = 4096


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, ServeError | TimeoutError):
        return "vllm_unavailable"
    if isinstance(exc, SlackApiError | SlackClientError):
        return "slack"
    if type(exc).__module__.startswith(("kubernetes", "urllib3")):
        return "kubernetes"
    return "other"


class BotMetrics:
    """One bot's metrics; with `enabled=False` every call returns at once (and nothing is served)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        self._replied: OrderedDict[str, None] = OrderedDict()
        self._exporter: Exporter | None = None
        self.events = Counter(
            "doppel_bot_events_received",
            "Slack events and commands delivered to the bot, retries included.",
            ["type", "team"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "doppel_bot_events_deduplicated",
            "Deliveries dropped because the event was already handled (Slack retries, other replicas).",
            ["type"],
            registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "doppel_bot_ack_seconds",
            "Time to answer Slack's HTTP request (the acknowledgement).",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.first_reply_seconds = Histogram(
            "doppel_bot_first_reply_seconds",
            "Time from a mention (its Slack timestamp) to the bot's first message in reply.",
            buckets=REPLY_BUCKETS,
            registry=self.registry,
        )
        self.replies = Counter(
            "doppel_bot_replies_posted",
            "Messages posted in reply to mentions.",
            ["team"],
            registry=self.registry,
        )
        self.errors = Counter(
            "doppel_bot_errors",
            "Errors by kind: vllm_unavailable, slack_rate_limited, mention_failed (an apology was posted), "
            "mention_lost (not even that), slack, kubernetes, other.",
            ["kind"],
            registry=self.registry,
        )

        self.mentions_waiting = Gauge(
            "doppel_bot_mentions_waiting",
            "Mentions held because no vLLM pod was ready (the pool scaled to zero), all replicas' alike: "
            "the autoscaler wakes the pool on it (take the max over bot pods).",
            registry=self.registry,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: any free port); returns the port."""
        self._exporter = Exporter(self.registry, port, addr)
        return self._exporter.port

    def close(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None

    # --- what the bot reports --------------------------------------------------------------------------

    def event_received(self, kind: str, team_id: str) -> None:
        if self.enabled:
            self.events.labels(kind, team_id).inc()

    def event_deduplicated(self, kind: str) -> None:
        if self.enabled:
            self.duplicates.labels(kind).inc()

    def acked(self, started: float) -> None:
        """Slack's request answered; `started` is its time.perf_counter() on arrival."""
        if self.enabled:
            self.ack_seconds.observe(time.perf_counter() - started)

    def reply_posted(self, team_id: str, mention_ts: str) -> None:
        if not self.enabled:
            return
        self.replies.labels(team_id).inc()
        key = f"{team_id}/{mention_ts}"
        if key in self._replied:
            return
        self._replied[key] = None
        if len(self._replied) > REMEMBERED:
            self._replied.popitem(last=False)
        self.first_reply_seconds.observe(max(0.0, time.time() - float(mention_ts)))

    def held(self, count: int) -> None:
        """How many mentions wait for a ready vLLM pod (the held store's count)."""
        if self.enabled:
            self.mentions_waiting.set(count)

    def held_one(self) -> None:
        """A mention held just now (the next count replaces this guess): the pool wakes without waiting."""
        if self.enabled:
            self.mentions_waiting.inc()

    def error(self, kind: str) -> None:
        if self.enabled:
            self.errors.labels(kind).inc()

    def failed(self, exc: BaseException) -> None:
        """Work that raised (the worker logs it): counted by kind."""
        self.error(error_kind(exc))
