"""Where the real Slack exports are (test data only, never copied into the repository).

`<repo root>/../shared/real-exports` holds public exports from other projects (see SOURCES.md there); a
checkout without it skips the tests that use them; DOPPEL_REAL_EXPORTS names another folder.
"""

from __future__ import annotations

import collections
import json
import os
import zipfile
from pathlib import Path

import pytest

# DOPPEL_REAL_EXPORTS points elsewhere (a git worktree whose parent has no shared/).
REAL_EXPORTS = Path(
    os.environ.get("DOPPEL_REAL_EXPORTS")
    or Path(__file__).resolve().parents[2].parent / "shared" / "real-exports"
)
HFARAN = "hfaran-slack-export-viewer/testarchive.zip"
RUSQ = "rusq-slackdump/source_export.zip"
ZULIP = "zulip-slack-fixtures/zulip-slack-fixtures.zip"


def real_export(name: str) -> Path:
    """The export ZIP `name` (relative to the folder), or skip the test when it is not there."""
    path = REAL_EXPORTS / name
    if not path.is_file():
        pytest.skip(f"real Slack exports not available ({path} is missing)")
    return path


def volume_exports(min_bytes: int = 1_000_000) -> list[Path]:
    """The exports with volume (community workspaces of thousands of messages, not the small fixtures), or
    none when the folder is absent."""
    return sorted(p for p in REAL_EXPORTS.glob("*/*.zip") if p.stat().st_size > min_bytes)


def most_active(export: Path, count: int) -> list[str]:
    """The IDs of the `count` people of `export` with the most human messages (a user, no bot, no subtype
    but a thread broadcast), as its SOURCES.md counts them. IDs, not names: names can be ambiguous."""
    counts: collections.Counter[str] = collections.Counter()
    with zipfile.ZipFile(export) as archive:
        for name in archive.namelist():
            if not name.endswith(".json") or "/" not in name.strip("/"):
                continue
            try:
                messages = json.loads(archive.read(name))
            except ValueError:
                continue
            for m in messages if isinstance(messages, list) else []:
                human = isinstance(m, dict) and m.get("user") and not m.get("bot_id")
                if human and m.get("subtype") in (None, "thread_broadcast"):
                    counts[m["user"]] += 1
    return [user for user, _ in counts.most_common(count)]
