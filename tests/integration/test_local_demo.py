"""`doppel local --demo`, run as a user runs it: the real command in a subprocess, offline but for pip.

The demo trains SmolLM2-135M-Instruct (built once into the models cache) on the demo export with its
default budget; that one run (`smollm2_demo`, shared with the vLLM test) is what these tests read. A second
run on the same work directory must reuse everything and train nothing.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.model_fixtures import doppel_local

from doppel.demo.workspace import MARGARET, SIGN_OFF, demo_questions
from doppel.local.serving import SERVING_FILE
from doppel.train.base_models import SMOLLM2_135M

TINY_QUICK = ("--max-steps", "2", "--max-tokens", "8")


def reply_columns(stdout: str) -> list[tuple[str, str]]:
    """(adapter reply, base reply) per question, read back from the side-by-side table."""
    replies = []
    for block in stdout.split("\n\n"):
        lines = block.splitlines()
        rule = next((i for i, line in enumerate(lines) if re.fullmatch(r"-+\+-+", line)), None)
        if rule is None:
            continue
        column = lines[rule].index("+") - 1
        rows = lines[rule + 1 :]
        left = " ".join(row[:column].strip() for row in rows)
        right = " ".join(row[column + 3 :].strip() for row in rows)
        replies.append((left.strip(), right.strip()))
    return replies


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_demo_shows_each_stage_with_its_time(smollm2_demo):
    stderr = smollm2_demo.proc.stderr
    for number, stage in enumerate(
        ("workspace", "base model", "scrape", "train", "eval", "replies"), start=1
    ):
        assert re.search(rf"\[{number}/6\] {stage} done in \d+\.\d+s", stderr), stage
    assert "base model done in" in stderr and ": smollm2-135m" in stderr
    steps = smollm2_demo.result["steps"]
    assert f"{steps}/{steps}" in stderr  # the trainer's own progress bar
    # Only doppel's lines: no library's log records or deprecation warnings among the stages.
    assert not re.search(r"^(DEBUG|INFO|WARNING):|FutureWarning", stderr, re.MULTILINE), stderr[-3000:]


def test_demo_answers_each_question_beside_the_persona_prompted_base(smollm2_demo):
    stdout = smollm2_demo.proc.stdout
    asked = demo_questions(MARGARET.id)
    for asker, question in asked:
        assert f"{asker.first_name}: {question}" in stdout
    assert stdout.count("adapter (Margaret Okafor)") == len(asked) == 3
    assert stdout.count("base model, persona prompt (no adapter)") == 3
    replies = reply_columns(stdout)
    assert len(replies) == len(asked)
    assert all(adapter and base and adapter != base for adapter, base in replies)
    # Real language in Margaret's manner: her sign-off, which the prompted base does not take up as a habit.
    assert sum(SIGN_OFF in " ".join(a.split()) for a, _ in replies) >= 2, replies


def test_fidelity_report_of_the_demo(smollm2_demo):
    """eval.json beside metrics.json; its headline figures printed and in the result."""
    report = json.loads((smollm2_demo.adapter / "eval.json").read_text())
    loss = report["heldout_loss"]
    assert loss["adapter"] < 0.7 * loss["base"]  # at least 30% below the base model's
    like = report["likeness"]
    assert like["adapter"] >= 0.9 * like["real"] and like["adapter"] >= like["prompted_base"] + 0.2, like
    assert like["classifier_accuracy"] >= 0.7
    # The classes: the person, the base model, and the colleagues with enough messages as long as the
    # person's samples must be (Dev and Jo write short ones), by the user IDs of their messages.
    assert set(like["classes"]) == {"person", "base model", "Sam"}
    assert report["distinct"]["adapter"] >= 0.5 and report["copy_rate"]["adapter"] <= 0.25
    assert report["length"]["person"] > 20 and report["examples"]
    for example in report["examples"]:
        assert SIGN_OFF in example["real"]
    assert report["split"]["heldout"] == report["heldout_samples"] > 0
    headline = smollm2_demo.result["eval"]
    assert headline["likeness_adapter"] == like["adapter"]
    assert headline["heldout_loss_adapter"] == pytest.approx(loss["adapter"], abs=1e-4)
    assert f"likeness            adapter {like['adapter']:.2f}" in smollm2_demo.proc.stdout
    # Beside the adapter's, the real replies' own distinct share: the person's templates are theirs.
    distinct = report["distinct"]
    line = next(x for x in smollm2_demo.proc.stdout.splitlines() if x.strip().startswith("distinct"))
    assert f"adapter {distinct['adapter']:.2f}" in line and f"real replies {distinct['real']:.2f}" in line
    # How often the replies repeat what memory put in their prompts, the adapter's and Margaret's own.
    use = report["memory_use"]
    assert use["replies"] > 0 and 0 <= use["adapter"] <= 1 and 0 <= use["real"] <= 1
    line = next(x for x in smollm2_demo.proc.stdout.splitlines() if x.strip().startswith("memory drawn on"))
    assert f"adapter {use['adapter']:.2f}" in line and f"real replies {use['real']:.2f}" in line


def test_everything_is_under_the_workdir_but_the_shared_model(smollm2_demo, smollm2_model):
    workdir, result = smollm2_demo.workdir, smollm2_demo.result
    adapter = Path(result["adapter"])
    assert adapter.parent.parent == workdir / "adapters"
    assert {"adapter_config.json", "metrics.json", "eval.json"} <= {p.name for p in adapter.iterdir()}
    assert (workdir / "demo" / "workspace.zip").is_file()
    assert not (workdir / "models").exists()  # the base model lives in the models cache, built once
    assert smollm2_model.name == SMOLLM2_135M.directory_name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m"
    manifest = json.loads((workdir / "data" / "margaret" / "manifest.json").read_text())
    # The CPU budget trains a few of the newest: doppel local keeps 500 where a scrape keeps 2,000.
    assert manifest["samples"] > 20 and manifest["options"]["max_samples"] == 500


def test_second_run_reuses_the_adapter_and_opens_the_chat(smollm2_demo, tmp_path):
    workdir, first = smollm2_demo.workdir, smollm2_demo.result
    adapter = Path(first["adapter"])
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    report = (adapter / "eval.json").read_text()
    again = doppel_local(
        "--demo", "--max-tokens", "24", "--chat",
        workdir=workdir, result=tmp_path / "again.json", stdin="is the roadmap ready?\n",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    # `doppel chat` on the result: the prompt, then the doppel's streamed answer; end of input ends it.
    chat = again.stdout.split("you> ", 1)[1]
    assert chat.startswith("Margaret Okafor> ") and chat.removeprefix("Margaret Okafor> ").strip()
    second = json.loads((tmp_path / "again.json").read_text())
    assert second["trained"] is False
    assert second["adapter"] == first["adapter"]
    assert second["added_samples"] == 0 and second["samples"] == first["samples"]
    assert "unchanged, reused" in again.stderr
    assert "train:" not in again.stderr  # no trainer progress bar: nothing was trained
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert (adapter / "eval.json").read_text() == report  # the report is reused too
    assert "held-out loss on unseen threads" in again.stdout and "likeness" in again.stdout
    # The one adapter, and the file that names it as the one served (the fidelity gate's record).
    assert sorted(p.name for p in adapter.parent.iterdir()) == sorted([adapter.name, SERVING_FILE])
    assert (adapter.parent / SERVING_FILE).read_text().strip() == adapter.name


def test_make_demo_works_from_a_clean_clone(tmp_path):
    """What a newcomer runs first: `make demo` in a fresh clone. The clone holds only what is committed;
    its demo runs on the suite's virtualenv (building a new one is `make venv`'s business), on the tiny model
    with few steps (the SmolLM2 demo itself is `smollm2_demo`)."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "doppel"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True, timeout=120)
    # A clean environment: under `make test` the outer make's variables would add directory messages.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    recipe = subprocess.run(
        ["make", "-n", "demo"], cwd=clone, capture_output=True, text=True, check=True, env=env
    )
    assert recipe.stdout.strip().splitlines()[-1] == ".venv/bin/doppel local --demo"

    env = {**os.environ, "PYTHONPATH": str(clone / "operator"), "HF_HUB_OFFLINE": "1"}
    env.pop("DOPPEL_RESULT_FILE", None)
    probe = [sys.executable, "-c", "import doppel; print(doppel.__file__)"]
    where = subprocess.run(probe, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(clone)), where.stdout
    demo = subprocess.run(
        [sys.executable, "-m", "doppel.cli", "local", "--demo", "--base-model", "doppel-tiny", *TINY_QUICK],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "held-out loss on unseen threads" in demo.stdout
    # The default work directory, inside the clone.
    assert list((clone / "doppel-data" / "adapters" / "margaret").iterdir())
