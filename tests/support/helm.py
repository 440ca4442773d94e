"""The real helm binary, and the doppel chart rendered with it, for any test that needs the manifests.

helm comes from `make tools` ($DOPPEL_TOOLS_DIR/bin/helm, default .tools/bin/helm). Tests that need it skip
when it is missing, unless $DOPPEL_REQUIRE_TOOLS=1 (as `make test` sets), in which case they fail.

    from tests.support.helm import render_chart, find_manifest
    manifests = render_chart(set_values={"vllm": {"replicas": 3}})
    role = find_manifest(manifests, "Role", "operator")
    env = rendered_env(manifests, "bot")  # what `doppel bot` starts with
    schema = third_party_crd_schema("keda/keda.sh_scaledobjects.yaml")  # KEDA's, strict

Third-party CRDs (KEDA's) are read from ../shared/crds beside the checkout ($DOPPEL_SHARED_DIR/crds when
set), never copied into the repository; tests that need them skip when they are absent.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "doppel"
TOOLS_DIR_ENV = "DOPPEL_TOOLS_DIR"
REQUIRE_TOOLS_ENV = "DOPPEL_REQUIRE_TOOLS"
SHARED_DIR_ENV = "DOPPEL_SHARED_DIR"
RELEASE = "doppel"
NAMESPACE = "doppel"
# The values the chart refuses to render without: a signing secret (the bot verifies every Slack request)
# and the workspaces it serves.
REQUIRED_TEST_VALUES: dict[str, Any] = {
    "slack": {"signingSecret": "test-signing-secret", "botToken": "xoxb-test"},
    "workspaces": ["T0TEST"],
}


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr, then its stdout."""


def tool(name: str) -> Path:
    """Path of a binary extracted by `make tools`; skips the test, or fails it when the tools are required."""
    tools_dir = Path(os.environ.get(TOOLS_DIR_ENV) or REPO_ROOT / ".tools")
    path = tools_dir / "bin" / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    reason = f"{path} does not exist (run `make tools`)"
    if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        pytest.fail(f"{name} is required (${REQUIRE_TOOLS_ENV}=1) but {reason}", pytrace=False)
    pytest.skip(f"{name} not available: {reason}")


def helm(*args: str, timeout: float = 60.0, cwd: Path | None = None) -> str:
    """Run helm with `args` offline (no repositories, no cluster) and return its stdout."""
    with tempfile.TemporaryDirectory(prefix="doppel-helm-") as home:
        # Keep helm's caches and config out of the user's home; it needs no cluster for lint/template.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
            "KUBECONFIG": f"{home}/kubeconfig",
        }
        proc = subprocess.run(
            [str(tool("helm")), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
            check=False,
        )
    if proc.returncode != 0:
        # helm lint reports its findings on stdout and only the verdict on stderr.
        raise HelmError("\n".join(filter(None, (proc.stderr.strip(), proc.stdout.strip()))) or "helm failed")
    return proc.stdout


def _write_values(path: Path, values: Mapping[str, Any]) -> str:
    path.write_text(yaml.safe_dump(dict(values)), encoding="utf-8")
    return str(path)


def _values_args(
    values_files: Iterable[Path | str], set_values: Mapping[str, Any] | None, required_values: bool, tmp: Path
) -> list[str]:
    """`-f` arguments: the required test values first, then the given files, then `set_values` as a file
    (a values file keeps YAML types, where `--set` would turn "1.5" into a string and "123" into a number)."""
    args: list[str] = []
    if required_values:
        args += ["-f", _write_values(tmp / "required.yaml", REQUIRED_TEST_VALUES)]
    for file in values_files:
        args += ["-f", str(file)]
    if set_values:
        args += ["-f", _write_values(tmp / "set.yaml", set_values)]
    return args


def template_chart(
    values_files: Iterable[Path | str] = (),
    set_values: Mapping[str, Any] | None = None,
    *,
    required_values: bool = True,
    extra_args: Iterable[str] = (),
) -> str:
    """`helm template` of charts/doppel as YAML text (CRDs included). Raises HelmError on failure."""
    with tempfile.TemporaryDirectory(prefix="doppel-values-") as tmp:
        args = _values_args(values_files, set_values, required_values, Path(tmp))
        return helm(
            "template",
            RELEASE,
            str(CHART_DIR),
            "--namespace",
            NAMESPACE,
            "--include-crds",
            *args,
            *extra_args,
        )


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping, as the API server's strict decoding
    does (PyYAML alone would silently keep the last one)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_manifests(text: str) -> list[dict[str, Any]]:
    """Parse multi-document YAML strictly (duplicate keys are an error); empty documents dropped."""
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc]


def render_chart(
    values_files: Iterable[Path | str] = (),
    set_values: Mapping[str, Any] | None = None,
    *,
    required_values: bool = True,
) -> list[dict[str, Any]]:
    """The chart's manifests as parsed objects, CRDs first. `set_values` is a nested mapping of values."""
    return parse_manifests(template_chart(values_files, set_values, required_values=required_values))


def find_manifests(manifests: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [m for m in manifests if m.get("kind") == kind]


def find_manifest(manifests: Iterable[Mapping[str, Any]], kind: str, component: str) -> Mapping[str, Any]:
    """The one `kind` object whose name ends with `-<component>` (e.g. ("Deployment", "vllm"))."""
    found = [m for m in find_manifests(manifests, kind) if m["metadata"]["name"].endswith(f"-{component}")]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} named *-{component}, found {len(found)}")
    return found[0]


def rendered_env(
    manifests: list[dict[str, Any]], component: str, secrets: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the component's container starts with: its Secret's keys (envFrom), then its env,
    with the pod's namespace (and name) filled in where a fieldRef asks for it. A value from a Secret the
    user creates (`secretKeyRef`) is `secrets["<name>/<key>"]`, else a stand-in naming it."""
    deployment = find_manifest(manifests, "Deployment", component)
    (spec,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == component]
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        secret = find_manifest(manifests, "Secret", source["secretRef"]["name"].rsplit("-", 1)[-1])
        env.update(secret["stringData"])
    for item in spec.get("env", []):
        value = item.get("value", item.get("valueFrom"))
        if isinstance(value, dict) and "secretKeyRef" in value:
            ref = f"{value['secretKeyRef']['name']}/{value['secretKeyRef']['key']}"
            value = (secrets or {}).get(ref, f"secret {ref}")
        elif isinstance(value, dict):
            pod = {"metadata.namespace": NAMESPACE, "metadata.name": f"{component}-pod"}
            value = pod[value["fieldRef"]["fieldPath"]]
        env[item["name"]] = value
    return env


def third_party_crd_schema(relative: str) -> dict[str, Any]:
    """The openAPIV3Schema of a third-party CRD under <shared>/crds (e.g. KEDA's ScaledObject), made strict:
    unknown fields refused, as the API server's strict field validation does (the CRD itself only prunes
    them). Skips the test when the file is absent."""
    shared = Path(os.environ.get(SHARED_DIR_ENV) or REPO_ROOT.parent / "shared")
    path = shared / "crds" / relative
    if not path.is_file():
        pytest.skip(f"third-party CRD not available ({path} is missing; set ${SHARED_DIR_ENV})")
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    return _strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out
