"""The adaptive rate budget's learning from a 429, without a server: the spacing it settles at."""

import pytest

from doppel.slack.ratelimit import PROFILES, Budget

METHOD = "conversations.history"


@pytest.mark.parametrize("spacing", [0.5, 1.0])
@pytest.mark.parametrize("gap", [0.02, 0.3])
def test_a_refusal_teaches_a_spacing_a_little_wider_than_slack_showed(spacing: float, gap: float) -> None:
    # Time runs 60x fast. One call is accepted at t=100; the next, `gap` later, is refused with a
    # Retry-After (Slack seconds) saying when the next token comes, so Slack's spacing is `spacing`. Calls
    # spaced at exactly that meet 429s whenever one request travels a few milliseconds faster than the one
    # before it: the budget must settle a little wider, never narrower, and never slower than Tier 1.
    budget = Budget(PROFILES["internal"], time_scale=60)
    budget.accepted(METHOD, 100.0)
    interval = budget.refused(METHOD, 100.0 + gap, 60 * (spacing - gap))
    assert spacing * 1.01 <= interval <= min(spacing * 1.1, 61 / 60)


def test_a_refusal_never_teaches_slower_than_the_slowest_documented_tier() -> None:
    budget = Budget(PROFILES["internal"], time_scale=60)
    budget.accepted(METHOD, 100.0)
    assert budget.refused(METHOD, 100.1, 3600) == pytest.approx(61 / 60)
