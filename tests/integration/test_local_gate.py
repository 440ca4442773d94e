"""The fidelity gate of `doppel local`: a retrained adapter that is worse than the one serving, on the same
held-out replies, is not served (the run says so and keeps the old one for the chat, the bot and the replies
shown), and `--force-promotion` serves it without training it again.

On the tiny model and the demo workspace: the default budget (240 steps) learns Margaret; two steps leave
the model near its random start."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from doppel.cli import main
from doppel.local.serving import SERVING_FILE, SERVING_REPORT


def local(workdir: Path, result: Path, *args: str) -> tuple[dict, str]:
    run = CliRunner(env={"DOPPEL_RESULT_FILE": str(result)}).invoke(
        main, ["local", "--demo", "--base-model", "doppel-tiny", "--workdir", str(workdir), *args]
    )
    assert run.exit_code == 0, (run.stderr, run.exception)
    return json.loads(result.read_text()), run.stdout


def test_a_worse_adapter_keeps_the_old_one_serving_until_forced(tmp_path, tiny_model):
    workdir, result = tmp_path / "doppel-data", tmp_path / "result.json"
    adapters = workdir / "adapters" / "margaret"

    first, _ = local(workdir, result)
    good = Path(first["adapter"])
    assert first["gate"]["promoted"] and first["gate"]["previous"] is None
    assert (adapters / SERVING_FILE).read_text().strip() == good.name

    second, report = local(workdir, result, "--max-steps", "2")
    worse = Path(second["gate"]["candidate"])
    assert second["trained"] and worse != good and worse.is_dir()
    assert not second["gate"]["promoted"]
    assert any(r.startswith("held-out loss") for r in second["gate"]["regressions"]), second["gate"]
    # Still serving the good adapter: the summary, its figures and the report are the old adapter's, measured
    # on the new adapter's held-out replies.
    assert second["adapter"] == str(good) and (adapters / SERVING_FILE).read_text().strip() == good.name
    assert second["eval"]["heldout_loss_adapter"] < second["eval"]["heldout_loss_base"]
    assert (worse / SERVING_REPORT).is_file()
    assert "NOT PROMOTED" in report and "--force-promotion" in report
    assert f"adapter {good}" in report.splitlines()[0]

    # Interrupted between the adapter's rename into place and its fingerprint (Ctrl-C): the rerun reuses the
    # complete adapter, and the gate still weighs it against the one serving.
    from doppel.local.settings import FINGERPRINT_FILE
    from doppel.train.fidelity import EVAL_FILE

    for left in (FINGERPRINT_FILE, EVAL_FILE, SERVING_REPORT):
        (worse / left).unlink()
    again, _ = local(workdir, result, "--max-steps", "2")
    assert not again["trained"] and again["gate"]["candidate"] == str(worse)
    assert not again["gate"]["promoted"] and again["adapter"] == str(good)
    assert (worse / FINGERPRINT_FILE).is_file()

    forced, report = local(workdir, result, "--max-steps", "2", "--force-promotion")
    assert not forced["trained"]  # the refused adapter, kept on disk, is served as it is
    assert forced["adapter"] == str(worse) and forced["gate"]["promoted"] and forced["gate"]["forced"]
    assert (adapters / SERVING_FILE).read_text().strip() == worse.name
    assert not good.exists()  # no longer served: deleted
    assert "by --force-promotion although worse" in report

    # Another base model: the old adapter cannot serve beside it, so there is nothing to weigh: served.
    other, _ = local(workdir, result, "--base-model", str(tiny_model), "--max-steps", "1")
    assert other["gate"]["promoted"] and other["gate"]["previous"] is None and other["trained"]
    assert (adapters / SERVING_FILE).read_text().strip() == Path(other["adapter"]).name
    assert not worse.exists()
