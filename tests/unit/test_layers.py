"""The layer rule (imports only downward; slack/train/serve/memory know nothing of kopf or Bolt), checked
by import-linter with the contracts in pyproject.toml, on the code as it is and on a copy that breaks it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_code_keeps_its_layers():
    result = lint_imports(ROOT / "operator")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_import_upward_or_of_kopf_breaks_a_contract(tmp_path):
    copy = tmp_path / "operator"
    pycache = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "operator" / "doppel", copy / "doppel", ignore=pycache)
    # serve reaching up into the bot, and the scraper importing kopf.
    with (copy / "doppel" / "serve" / "chat.py").open("a") as f:
        f.write("\nfrom doppel.bot import safety  # noqa\n")
    with (copy / "doppel" / "slack" / "normalize.py").open("a") as f:
        f.write("\nimport kopf  # noqa\n")
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout
    assert "0 kept, 2 broken" in result.stdout
    assert "doppel.serve.chat -> doppel.bot.safety" in result.stdout
    assert "doppel.slack.normalize -> kopf" in result.stdout
