"""The operator's commands as a user (or a cleanup Job) runs them: cleanup, operator, crd."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from doppel.cli import main


def test_cleanup_removes_only_inside_the_data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    dataset = root / "team" / "alice" / "g1"
    dataset.mkdir(parents=True)
    (dataset / "samples.jsonl").write_text("{}\n")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    result_file = tmp_path / "result.json"
    monkeypatch.setenv("DOPPEL_RESULT_FILE", str(result_file))

    escape = CliRunner().invoke(
        main, ["cleanup", "--data-root", str(root), str(root / ".." / "precious.txt")]
    )
    assert escape.exit_code == 2
    assert escape.stderr.strip().splitlines() == [
        f"doppel: error: refusing to remove {root / '..' / 'precious.txt'}: not inside --data-root {root}"
    ]
    assert outside.read_text() == "keep me"
    assert json.loads(result_file.read_text())["kind"] == "bad_input"

    whole = CliRunner().invoke(main, ["cleanup", "--data-root", str(root), str(root)])
    assert whole.exit_code == 2 and root.exists()

    ok = CliRunner().invoke(main, ["cleanup", "--data-root", str(root), str(dataset), str(root / "gone")])
    assert ok.exit_code == 0, ok.output
    assert not dataset.exists() and (root / "team" / "alice").exists()
    assert json.loads(result_file.read_text()) == {"ok": True, "removed": [str(dataset.resolve())]}


def test_operator_refuses_bad_settings_before_starting():
    relative = CliRunner().invoke(main, ["operator", "--data-root", "data"])
    assert relative.exit_code == 2
    assert "--data-root must be an absolute path" in relative.stderr
    zero = CliRunner().invoke(main, ["operator", "--max-trainings", "0"])
    assert zero.exit_code == 2 and "max-trainings" in zero.output
    never = CliRunner().invoke(main, ["operator"], env={"DOPPEL_PROGRESS_SECONDS": "0"})
    assert never.exit_code == 2 and "progress-interval" in never.output


def test_crd_command_prints_the_crd():
    result = CliRunner().invoke(main, ["crd"])
    assert result.exit_code == 0
    crd = yaml.safe_load(result.output)
    assert crd["metadata"]["name"] == "doppelusers.doppel.dev"
