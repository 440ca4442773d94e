"""A stage that cannot write the shared volume says which path and as whom, as kind "storage" in its
result file (the operator's StorageWritable condition), instead of a traceback deep inside a library."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from doppel.cli import main


def test_an_unwritable_path_is_a_storage_failure_with_path_and_user(tmp_path):
    result_file = tmp_path / "result.json"
    # /sys refuses new directories even to root (EPERM): a volume that does not let this user write.
    result = CliRunner().invoke(
        main, ["make-tiny-model", "/sys/doppel-test/model"], env={"DOPPEL_RESULT_FILE": str(result_file)}
    )
    assert result.exit_code == 1
    summary = json.loads(result_file.read_text())
    assert summary["ok"] is False and summary["kind"] == "storage"
    assert summary["reason"].startswith("cannot write /sys/doppel-test: not permitted")
    assert f"uid {os.getuid()}" in summary["reason"]
    assert "Traceback" not in result.output and result.output.count("\n") == 1
