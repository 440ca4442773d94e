"""The DoppelUser CRD: generated from doppel.api, committed without drift, and really validating."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from doppel.api import DoppelUserSpec, DoppelUserStatus
from doppel.crd import crd_manifest

ROOT = Path(__file__).resolve().parents[2]

GOOD: dict[str, Any] = {
    "apiVersion": "doppel.dev/v1alpha1",
    "kind": "DoppelUser",
    "metadata": {"name": "alice", "namespace": "team"},
    "spec": {
        "slack": {
            "teamId": "T0123ABC",
            "tokenSecretRef": {"name": "slack-bot", "key": "token"},
            "channels": {"include": ["general"], "exclude": ["random"]},
        },
        "target": {"handle": "alice"},
        "data": {"cutoffDays": 90, "minLength": 20, "maxSamples": 300},
        "baseModel": {"servedName": "llama", "path": "/models/llama"},
        "training": {"rank": 8, "alpha": 16, "learningRate": 0.001, "maxSteps": 5},
        "resources": {"gpu": 1, "memory": "16Gi"},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "vllm": {"selector": {"app": "vllm"}},
        "retrainSchedule": "0 3 * * 1",
        "retention": {"afterTraining": "Keep", "onDeletion": "Delete"},
    },
}


def _schema() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _validate(obj: dict[str, Any]) -> None:
    # OpenAPI v3.0 schemas are draft-4 style (boolean exclusiveMinimum).
    jsonschema.Draft4Validator(_schema()).validate(obj)


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the field at dotted `path` set to `value` (or removed when value is ...)."""
    obj = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    node = obj
    for key in parents:
        node = node[key]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return obj


def test_crd_file_matches_generated_output():
    """`doppel crd` prints exactly what crds/doppelusers.yaml holds (run `make crd` after changing api.py)."""
    out = subprocess.run(
        [sys.executable, "-m", "doppel.cli", "crd"], capture_output=True, text=True, check=True
    ).stdout
    committed = (ROOT / "crds" / "doppelusers.yaml").read_text()
    assert out == committed, "crds/doppelusers.yaml is stale: run `make crd`"


def test_crd_shape_and_names():
    crd = yaml.safe_load((ROOT / "crds" / "doppelusers.yaml").read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("doppel.dev", "Namespaced")
    assert spec["names"]["kind"] == "DoppelUser"
    assert spec["names"]["plural"] == "doppelusers"
    assert spec["names"]["shortNames"] == ["doppel"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Samples", "Adapter", "Age"]


def test_schema_is_structural():
    """No $ref, anyOf/oneOf, nulls or additionalProperties:false: the API server refuses those forms."""
    text = json.dumps(_schema())
    for banned in ('"$ref"', '"anyOf"', '"oneOf"', '"allOf"', '"null"', '"$defs"', '"const"'):
        assert banned not in text

    def walk(node: dict[str, Any], where: str) -> None:
        assert "type" in node, f"{where} has no type"
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}{{}}")

    walk(_schema(), "")


def test_good_object_is_accepted_by_schema_and_models():
    _validate(GOOD)
    spec = DoppelUserSpec.model_validate(GOOD["spec"])
    assert spec.target.handle == "alice" and spec.training.rank == 8
    # Defaults fill what the manifest leaves out.
    assert spec.suspend is False and spec.retention.after_training == "Keep"
    minimal = {k: GOOD["spec"][k] for k in ("slack", "target", "baseModel")}
    assert DoppelUserSpec.model_validate(minimal).retention.after_training == "Delete"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec", ...),
        ("spec.slack", ...),
        ("spec.baseModel", ...),
        ("spec.slack.teamId", "not-a-team"),
        ("spec.slack.tokenSecretRef", {"name": "Bad_Name"}),
        ("spec.slack.exportPath", "../etc/passwd"),
        ("spec.slack.exportPath", "/abs/export.zip"),
        ("spec.target", {}),
        ("spec.target", {"userId": "alice"}),
        ("spec.data.cutoffDays", 0),
        ("spec.data.minLength", -1),
        ("spec.data.maxSamples", "many"),
        ("spec.training.rank", 0),
        ("spec.training.learningRate", 0),
        ("spec.training.learningRate", 2.0),
        ("spec.resources.gpu", -1),
        ("spec.resources.memory", "lots"),
        ("spec.tolerations", [{"key": "gpu", "operator": "Maybe"}]),
        ("spec.tolerations", [{"key": "gpu", "effect": "Sometimes"}]),
        ("spec.vllm.selector", {}),
        ("spec.vllm.port", 70000),
        ("spec.retrainSchedule", "weekly"),
        ("spec.retention.afterTraining", "Archive"),
        ("spec.suspend", "yes"),
    ],
)
def test_schema_and_models_reject_bad_objects(path, value):
    bad = _with(path, value)
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    if path != "spec":
        with pytest.raises(ValidationError):
            DoppelUserSpec.model_validate(bad["spec"])


def test_token_or_export_is_required():
    """A Slack source is needed: enforced by pydantic and by a CEL rule the API server runs."""
    spec = copy.deepcopy(GOOD["spec"])
    del spec["slack"]["tokenSecretRef"]
    with pytest.raises(ValidationError, match="tokenSecretRef"):
        DoppelUserSpec.model_validate(spec)
    spec["slack"]["exportPath"] = "exports/acme.zip"
    assert DoppelUserSpec.model_validate(spec).slack.export_path == "exports/acme.zip"
    rules = _schema()["properties"]["spec"]["properties"]["slack"]["x-kubernetes-validations"]
    assert rules[0]["rule"] == "has(self.tokenSecretRef) || has(self.exportPath)"


def test_status_round_trips_through_schema():
    status = DoppelUserStatus.model_validate(
        {
            "phase": "Ready",
            "observedGeneration": 2,
            "samples": 40,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Loaded",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "adapter": {"servedName": "team-alice-v2", "path": "/data/a", "version": 2},
            "servedBy": ["vllm-0"],
        }
    )
    obj = {**GOOD, "status": status.model_dump(mode="json", by_alias=True, exclude_none=True)}
    _validate(obj)
    with pytest.raises(jsonschema.ValidationError):
        _validate({**GOOD, "status": {"phase": "Done"}})
