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


def test_any_other_os_error_is_one_line_and_exit_1_not_a_traceback(tmp_path):
    """An OSError that is not a volume refusing writes (here: a file where a directory should be) goes the
    way of every unexpected error: one line, exit 1, kind "error" in the result file."""
    result_file = tmp_path / "result.json"
    (tmp_path / "a-file").write_text("not a directory")
    result = CliRunner().invoke(
        main,
        ["make-tiny-model", str(tmp_path / "a-file" / "model")],
        env={"DOPPEL_RESULT_FILE": str(result_file)},
    )
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert result.stderr.startswith("doppel: failed: FileExistsError: ")
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    summary = json.loads(result_file.read_text())
    assert summary["ok"] is False and summary["kind"] == "error"
