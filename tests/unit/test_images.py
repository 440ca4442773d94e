"""The Dockerfiles under images/, checked with a Dockerfile parser (no Docker engine runs here).

What a broken image would show first: an unknown instruction, a floating base tag, root at run time, a
COPY of a file that is missing or that .dockerignore keeps out of the build context, an entry point other
than `doppel`, or a dependency that the constraints file does not pin.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = REPO_ROOT / "images"
# Dockerfile, the extras it installs, and the chart value naming the image it builds.
DOCKERFILES = {
    "Dockerfile": ("operator,bot,slack", "app"),
    "worker.Dockerfile": ("slack,train", "worker"),
    "worker-cpu.Dockerfile": ("slack", "workerCpu"),
}
# The doppel packages each image's commands run (operator+bot: `doppel operator`, `doppel bot`; worker:
# `doppel scrape`, `doppel train`, `doppel cleanup`).
IMAGE_PACKAGES = {
    "Dockerfile": ("doppel.cli", "doppel.operator", "doppel.bot"),
    "worker.Dockerfile": ("doppel.cli", "doppel.slack", "doppel.train"),
    "worker-cpu.Dockerfile": ("doppel.cli", "doppel.slack"),
}
# Distribution names whose import name differs.
IMPORT_NAMES = {"pyyaml": "yaml"}
# Imports every module of the given packages with the given top-level modules made unimportable, as in
# an image where they are not installed; prints the modules that fail.
IMPORT_WITHOUT = """
import importlib, pkgutil, sys
blocked = set(sys.argv[1].split(","))

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"No module named {name!r} (not installed in this image)")

sys.meta_path.insert(0, NotInstalled())
for package in sys.argv[2].split(","):
    module = importlib.import_module(package)
    path = getattr(module, "__path__", None)
    for name in [package, *(m.name for m in pkgutil.walk_packages(path, package + ".") if path)]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"{name}: {exc}")
"""
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR", "COMMENT",
}  # fmt: skip


def parse(name: str) -> DockerfileParser:
    parser = DockerfileParser(fileobj=io.BytesIO((IMAGES / name).read_bytes()))
    assert parser.structure, f"{name} is empty"
    return parser


def final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    starts = [i for i, ins in enumerate(parser.structure) if ins["instruction"] == "FROM"]
    return parser.structure[starts[-1] :]


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Docker's pattern match, segment by segment: `*`/`?` within a segment, `**` for any number of them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    regex = re.escape(pattern[0]).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.fullmatch(regex, parts[0]) is not None and _glob_match(pattern[1:], parts[1:])


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repo) out of the build context: the last
    matching pattern decides, and a pattern matching a directory covers everything under it."""
    rules = []
    for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, line.lstrip("!").strip("/").split("/")))
    parts = path.strip("/").split("/")
    excluded = False
    for negated, pattern in rules:
        if any(_glob_match(pattern, parts[:n]) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_well_formed(name: str) -> None:
    parser = parse(name)
    assert {ins["instruction"] for ins in parser.structure} <= INSTRUCTIONS
    assert parser.structure[0]["instruction"] in {"ARG", "FROM", "COMMENT"}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name: str) -> None:
    parser = parse(name)
    stages = set()
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            words = ins["value"].split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
    external = [image for image in parser.parent_images if image not in stages]
    assert external
    for image in external:
        assert "$" not in image, f"{name}: base {image!r} has an ARG without a default"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: base {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: base tag {tag!r} is not a version"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_numeric_non_root_user_with_doppel_entrypoint(name: str) -> None:
    stage = final_stage(parse(name))
    users = [ins["value"].split(":")[0] for ins in stage if ins["instruction"] == "USER"]
    assert users, f"{name}: final stage sets no USER, so it runs as root"
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert users[-1].isdigit() and int(users[-1]) != 0
    (entrypoint,) = [ins["value"] for ins in stage if ins["instruction"] == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["doppel"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists_and_is_in_the_build_context(name: str) -> None:
    copies = [ins["value"].split() for ins in parse(name).structure if ins["instruction"] in {"COPY", "ADD"}]
    sources = [
        src for words in copies if not any(w.startswith("--from") for w in words) for src in words[:-1]
    ]
    assert sources
    for source in sources:
        assert not source.startswith("--"), f"{name}: unexpected flag {source}"
        assert (REPO_ROOT / source).exists(), f"{name}: COPY source {source} does not exist"
        assert not dockerignored(source), f"{name}: COPY source {source} is excluded by .dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_its_extras_with_every_dependency_pinned(name: str) -> None:
    extras, _ = DOCKERFILES[name]
    runs = " ".join(ins["value"] for ins in parse(name).structure if ins["instruction"] == "RUN")
    assert "--constraint images/constraints.txt" in runs
    assert f'".[{extras}]"' in runs
    pins = {}
    for line in (IMAGES / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            assert str(requirement.specifier).startswith("=="), f"constraints.txt: {line} is not pinned"
            pins[_normal(requirement.name)] = requirement
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in extras.split(","):
        wanted += project["optional-dependencies"][extra]
    for spec in wanted:
        requirement = Requirement(spec)
        pinned = pins.get(_normal(requirement.name))
        assert pinned is not None, f"{requirement.name} is not pinned in images/constraints.txt"
        version = str(pinned.specifier).removeprefix("==")
        assert requirement.specifier.contains(version), f"pin {pinned} does not satisfy {spec}"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    for path in (".venv/bin/python", ".tools/bin/helm", ".git/HEAD", "doppel-data/x", "tests/conftest.py"):
        assert dockerignored(path), path
    assert not dockerignored("operator/doppel/cli/__init__.py")
    assert dockerignored("operator/doppel/__pycache__/cli.cpython-311.pyc")


def test_chart_defaults_name_the_images_built_here() -> None:
    """The build commands in the Dockerfiles tag the repositories the chart pulls by default, and the vLLM
    image is the version the test suite's vLLM runs (Makefile VLLM_VERSION)."""
    values = yaml.safe_load((REPO_ROOT / "charts" / "doppel" / "values.yaml").read_text(encoding="utf-8"))
    chart = yaml.safe_load((REPO_ROOT / "charts" / "doppel" / "Chart.yaml").read_text(encoding="utf-8"))
    for name, (_, key) in DOCKERFILES.items():
        text = (IMAGES / name).read_text(encoding="utf-8")
        tag = f"{values['images'][key]['repository']}:{chart['appVersion']}"
        assert f"docker build -f images/{name} -t {tag} ." in text
    version = re.search(r"^VLLM_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert version is not None
    assert values["images"]["vllm"]["tag"] == f"v{version.group(1)}"


def _import_names(extras: list[str]) -> set[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += [s for s in project["optional-dependencies"][extra] if not s.startswith("doppel[")]
    names = {_normal(Requirement(spec).name) for spec in specs}
    return {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in names}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_commands_import_without_the_other_extras(name: str) -> None:
    """The slim image has no torch, the worker no kopf or Bolt: every module their commands run must
    import without them (heavy imports stay inside the functions that need them)."""
    extras = DOCKERFILES[name][0].split(",")
    others = [e for e in ("slack", "train", "operator", "bot") if e not in extras]
    missing = _import_names(others) - _import_names(extras)
    assert missing
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT, ",".join(sorted(missing)), ",".join(IMAGE_PACKAGES[name])],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "", f"{name}: these modules need packages the image lacks:\n{proc.stdout}"


def test_every_image_has_the_python_the_constraints_were_resolved_for() -> None:
    """One Python for all images and images/constraints.txt (pinned from a 3.11 virtualenv): the same
    base for the three doppel images, so a wheel pinned there exists for each."""
    bases = set()
    for name in DOCKERFILES:
        (arg,) = [
            i["value"]
            for i in parse(name).structure
            if i["instruction"] == "ARG" and "PYTHON_IMAGE=" in i["value"]
        ]
        bases.add(arg.split("=", 1)[1])
    (base,) = bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    assert sys.version_info[:2] == (3, 11), "the constraints are pinned from this interpreter's virtualenv"
