"""Where the real Slack exports are (test data only, never copied into the repository).

`<repo root>/../shared/real-exports` holds public exports from other projects (see SOURCES.md there); a
checkout without it skips the tests that use them; DOPPEL_REAL_EXPORTS names another folder.
"""

from __future__ import annotations

import os
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
