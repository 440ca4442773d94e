"""`doppel local --demo`, run as a user runs it: the real command in a subprocess, fully offline.

One demo run (few steps) is shared by the tests of this module; a second run on the same work directory
must reuse everything and train nothing.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from doppel.demo.workspace import MARGARET, demo_questions

STEPS = 24


def doppel_local(*args: str, workdir: Path, result: Path, stdin: str = "") -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("doppel")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "doppel.cli"]
    env = {**os.environ, "DOPPEL_RESULT_FILE": str(result), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*command, "local", *args, "--workdir", str(workdir)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("local-demo")
    workdir = root / "doppel-data"
    first = doppel_local("--demo", "--max-steps", str(STEPS), workdir=workdir, result=root / "first.json")
    assert first.returncode == 0, first.stderr[-3000:]
    return workdir, first, json.loads((root / "first.json").read_text())


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


def test_demo_shows_each_stage_with_its_time(demo):
    _, run, _ = demo
    for number, stage in enumerate(("workspace", "base model", "scrape", "train", "replies"), start=1):
        assert re.search(rf"\[{number}/5\] {stage} done in \d+\.\d+s", run.stderr), stage
    # The trainer's own progress bar.
    assert f"{STEPS}/{STEPS}" in run.stderr


def test_demo_answers_each_question_beside_the_base_model(demo):
    _, run, _ = demo
    asked = demo_questions(MARGARET.id)
    for asker, question in asked:
        assert f"{asker.first_name}: {question}" in run.stdout
    assert run.stdout.count("adapter (Margaret Okafor)") == len(asked) == 3
    replies = reply_columns(run.stdout)
    assert len(replies) == len(asked)
    assert all(adapter and base and adapter != base for adapter, base in replies)


def test_adapter_learned_the_demo_persons_voice(demo):
    workdir, run, result = demo
    # Numerically: the held-out loss on unseen threads, as printed and as reported.
    printed = re.search(r"base model (\d+\.\d+) -> adapter (\d+\.\d+)", run.stdout)
    assert printed, run.stdout[-1000:]
    assert float(printed[2]) < float(printed[1])
    assert result["ok"] and result["trained"] is True and result["steps"] == STEPS
    assert result["adapter_eval_loss"] < result["base_eval_loss"]
    # Visibly: the adapter's replies use the person's words far more than the base model's do.
    samples = (workdir / "data" / "margaret" / "samples.jsonl").read_text().splitlines()
    vocabulary = {w for line in samples for w in words(json.loads(line)["messages"][-1]["content"])}

    def share(text: str) -> float:
        found = words(text)
        return sum(w in vocabulary for w in found) / max(len(found), 1)

    replies = reply_columns(run.stdout)
    adapter_share = sum(share(a) for a, _ in replies) / len(replies)
    base_share = sum(share(b) for _, b in replies) / len(replies)
    assert adapter_share > 2 * base_share + 0.05, (adapter_share, base_share)


def test_everything_is_under_the_workdir(demo):
    workdir, _, result = demo
    adapter = Path(result["adapter"])
    assert adapter.parent.parent == workdir / "adapters"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "metrics.json").is_file()
    assert (workdir / "demo" / "workspace.zip").is_file()
    assert (workdir / "models" / "doppel-tiny" / "config.json").is_file()
    assert json.loads((workdir / "data" / "margaret" / "manifest.json").read_text())["samples"] > 20


def test_second_run_reuses_the_adapter_and_opens_the_chat(demo, tmp_path):
    workdir, _, first = demo
    adapter = Path(first["adapter"])
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    again = doppel_local(
        "--demo", "--max-steps", str(STEPS), "--max-tokens", "24", "--chat",
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
    assert "held-out loss on unseen threads" in again.stdout
    assert [p.name for p in adapter.parent.iterdir()] == [adapter.name]


def test_make_demo_works_from_a_clean_clone(tmp_path):
    """What a newcomer runs first: `make demo` in a fresh clone. The clone holds only what is committed;
    its demo runs on the suite's virtualenv (building a new one is `make venv`'s business) with few steps."""
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
        [sys.executable, "-m", "doppel.cli", "local", "--demo", "--max-steps", "2", "--max-tokens", "8"],
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
