import json

import click
from click.testing import CliRunner

from doppel.cli import main, run_stage
from doppel.errors import BadInput


@main.command("_probe", hidden=True)
@click.argument("what")
@run_stage
def _probe(what: str) -> dict:
    if what == "bad":
        raise BadInput("not enough data (3 < 20)")
    if what == "boom":
        raise RuntimeError("disk on fire")
    return {"samples": 42}


def test_bad_input_exits_2_with_one_line_and_a_result_file(tmp_path, monkeypatch):
    result_file = tmp_path / "termination-log"
    monkeypatch.setenv("DOPPEL_RESULT_FILE", str(result_file))
    result = CliRunner().invoke(main, ["_probe", "bad"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "doppel: error: not enough data (3 < 20)"
    assert json.loads(result_file.read_text()) == {
        "ok": False,
        "kind": "bad_input",
        "reason": "not enough data (3 < 20)",
    }


def test_unexpected_error_exits_1_without_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPPEL_RESULT_FILE", str(tmp_path / "r"))
    result = CliRunner().invoke(main, ["_probe", "boom"])
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert "RuntimeError: disk on fire" in result.stderr


def test_success_writes_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPPEL_RESULT_FILE", str(tmp_path / "r"))
    result = CliRunner().invoke(main, ["_probe", "ok"])
    assert result.exit_code == 0
    assert json.loads((tmp_path / "r").read_text()) == {"ok": True, "samples": 42}


def test_every_subcommand_has_help():
    runner = CliRunner()
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


def test_a_result_over_the_termination_message_limit_loses_its_largest_entries_first(tmp_path, monkeypatch):
    # A train Job's result that grew past what Kubernetes keeps: the operator must still read the outcome,
    # the losses and the gate's verdict; the bulky entry goes, and the result says so.
    from doppel.cli.common import RESULT_FILE_LIMIT, write_result

    monkeypatch.setenv("DOPPEL_RESULT_FILE", str(tmp_path / "r"))
    verdict = ["likeness 0.40 < 0.70 serving (6 replies no longer taken for the person's, 0 newly; p=0.016)"]
    write_result({"ok": True, "steps": 20, "adapter_eval_loss": 3.366, "gate_regressions": verdict,
                  "memory_eval": {"examples": ["x" * 300] * 20}})  # fmt: skip
    text = (tmp_path / "r").read_text()
    assert len(text.encode()) <= RESULT_FILE_LIMIT
    assert json.loads(text) == {"ok": True, "steps": 20, "adapter_eval_loss": 3.366,
                                "gate_regressions": verdict, "truncated": ["memory_eval"]}  # fmt: skip

    write_result({"ok": False, "kind": "error", "reason": "RuntimeError: " + "y" * 10_000})
    failure = json.loads((tmp_path / "r").read_text())
    assert (failure["ok"], failure["kind"]) == (False, "error")
    assert failure["reason"].startswith("RuntimeError: yyy")
