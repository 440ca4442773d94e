"""The incremental scrape's state file: per channel, the newest top-level message taken, the threads seen
with their latest reply, and a pass under way ("partial"); which recorded threads to re-check for late
replies.

Loading validates the whole file (a state file of another team or person, or a malformed one, is bad
input); saving replaces it atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from doppel.errors import BadInput
from doppel.fsutil import atomic_write_text
from doppel.slack.samples import ts_key

STATE_VERSION = 1


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


def partial_entry(
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


def load_state(path: Path, team: str, person: str) -> dict[str, dict[str, Any]]:
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


def save_state(path: Path, team: str, person: str, channels: dict[str, dict[str, Any]]) -> None:
    data = {"version": STATE_VERSION, "team": team, "person": person, "channels": channels}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
