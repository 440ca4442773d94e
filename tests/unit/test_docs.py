"""The documentation site: its reference pages are what the code says today, and it builds with
`mkdocs build --strict` (every link and anchor resolves), as `make docs` builds it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).with_name("mkdocs")


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_pages_are_generated_from_the_code(tmp_path):
    # In a fresh interpreter, as `make docs` runs it: click caches each command's help option from the first
    # context that asks, and other tests build contexts of their own.
    subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py"), str(tmp_path)], check=True)
    written = sorted(tmp_path.iterdir())
    assert [p.name for p in written] == ["cli.md", "crd.md"]
    for fresh in written:
        committed = ROOT / "docs" / "reference" / fresh.name
        assert committed.exists() and committed.read_text() == fresh.read_text(), (
            f"docs/reference/{fresh.name} differs from the code: run `make docs` and commit it"
        )


def test_the_reference_pages_say_what_a_user_looks_up():
    gen = load_generator()
    cli, crd = gen.render_cli(), gen.render_crd()
    # Every command, with its own --help (its options), and no hidden ones.
    for command in ("scrape", "train", "eval", "chat", "local", "operator", "bot", "crd"):
        assert f"\n## doppel {command}\n" in cli
        assert f"Usage: doppel {command} [OPTIONS]" in cli
    assert "--max-samples" in cli and "--rate-profile" in cli
    # Every field path of the schema, with its constraints.
    for section in ("spec.slack", "spec.training", "status.eval"):
        assert f"\n## {section}\n" in crd
    assert 'One of `internal`, `marketplace`, `non-marketplace`; default `"internal"`' in crd


def test_the_site_builds_strictly_with_no_broken_link_or_anchor(tmp_path):
    result = subprocess.run(
        [
            str(MKDOCS),
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("index.html")}
    assert {
        "index.html",
        "security/index.html",
        "reference/cli/index.html",
        "reference/crd/index.html",
    } <= pages
