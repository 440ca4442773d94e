"""Scrape progress: the `doppel scrape --json-progress` lines in the status, and in `/doppel status`."""

import json
from datetime import UTC, datetime

from doppel.api import DoppelUserStatus
from doppel.bot import logic
from doppel.operator.progress import latest_scrape_progress, record_scrape_progress

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def line(**event):
    return json.dumps({"event": "scrape", **event})


def test_the_last_well_formed_scrape_line_counts():
    log = "\n".join(
        [
            '{"event": "scrape", "channels_do',  # cut by the log tail
            line(channels_done=1, channels_total=4, messages=120, rate_limited=2, wait_s=0.0),
            "doppel: skipped channel #random: the channel is archived (is_archived)",
            line(
                channels_done=2,
                channels_total=4,
                messages=300,
                rate_limited=3,
                wait_s=41.5,
                waiting_on="conversations.replies",
            ),
            line(channels_done="x", channels_total=4, messages=1),
            '{"event": "progress", "step": 1, "total_steps": 2}',
        ]
    )
    seen = latest_scrape_progress(log)
    assert seen is not None
    assert (seen.channels_done, seen.channels_total, seen.messages, seen.rate_limited) == (2, 4, 300, 3)
    assert (seen.wait_s, seen.waiting_on) == (41.5, "conversations.replies")
    assert latest_scrape_progress("no json here\n") is None


def test_status_follows_the_log_and_is_untouched_when_nothing_changed():
    status = DoppelUserStatus(phase="Scraping")
    seen = latest_scrape_progress(line(channels_done=0, channels_total=3, messages=15, rate_limited=0))
    new = record_scrape_progress(status, seen, NOW)
    assert new.scraping is not None and new.scraping.messages == 15 and new.scraping.updated_at == NOW
    assert record_scrape_progress(new, seen, NOW.replace(hour=1)) is new
    assert record_scrape_progress(new, None, NOW) is new


def test_doppel_status_shows_channels_messages_and_the_wait():
    status = DoppelUserStatus(phase="Scraping")
    seen = latest_scrape_progress(
        line(
            channels_done=1,
            channels_total=3,
            messages=212,
            rate_limited=4,
            wait_s=58,
            waiting_on="conversations.history",
        )
    )
    status = record_scrape_progress(status, seen, NOW)
    doppel = {"metadata": {"name": "alice"}, "status": status.model_dump(by_alias=True, mode="json")}
    assert logic.describe(doppel) == (
        "*alice*: Scraping (1 of 3 channels, 212 messages, waiting 58 s for Slack's rate limit)"
    )
