"""`doppel operator dry-run -f doppeluser.yaml`: run as an admin or a CI policy step would, with the
environment the chart gives the operator, its YAML is every Job the operator would create, and each passes
the Kubernetes schemas and Pod Security "restricted" with requests and memory limits."""

from __future__ import annotations

import copy

import kubernetes_validate
import yaml
from click.testing import CliRunner
from tests.support.helm import CHART_DIR, render_chart, rendered_env
from tests.support.pod_security import qos_class, resource_violations, restricted_violations

from doppel.cli import main
from doppel.operator import jobs

EXAMPLE = CHART_DIR / "examples" / "doppeluser.yaml"


def dry_run(env: dict[str, str], manifest: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["operator", "dry-run", "-f", "-"], input=manifest, env=env)
    return result.exit_code, result.stdout, result.stderr


def test_dry_run_prints_every_job_the_operator_would_create_with_the_chart_settings() -> None:
    env = rendered_env(render_chart(set_values={"jobs": {"ttlSecondsAfterFinished": 900}}), "operator")
    code, out, err = dry_run(env, EXAMPLE.read_text(encoding="utf-8"))
    assert code == 0, err
    objects = list(yaml.safe_load_all(out))
    steps = [o["metadata"]["labels"][jobs.L_STEP] for o in objects]
    assert steps == ["scrape", "train", "cleanup", "purge"]
    for job in objects:
        assert job["kind"] == "Job" and job["metadata"]["namespace"] == "doppel"  # the chart's namespace
        kubernetes_validate.validate(job, "1.33.0", strict=True)
        pod = job["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [] and resource_violations(pod) == []
        assert qos_class(pod) == "Burstable"
        # None at creation: the operator gives the chart's 900 once it has recorded the Job's outcome.
        assert "ttlSecondsAfterFinished" not in job["spec"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == env["DOPPEL_DATA_CLAIM"]
    scrape, train = objects[0], objects[1]
    assert scrape["spec"]["template"]["spec"]["containers"][0]["image"].endswith("doppel-worker-cpu:0.1.0")
    assert train["spec"]["template"]["spec"]["containers"][0]["image"] == env["DOPPEL_WORKER_IMAGE"]
    # The chart's train defaults: a GPU, tolerating the GPU taint.
    assert train["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_dry_run_keeps_what_retention_keeps_and_refuses_bad_input_in_one_line() -> None:
    env = rendered_env(render_chart(), "operator")
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    kept = copy.deepcopy(example)
    kept["spec"]["retention"] = {"afterTraining": "Keep", "onDeletion": "Keep"}
    code, out, _ = dry_run(env, yaml.safe_dump(kept))
    assert code == 0 and [o["metadata"]["labels"][jobs.L_STEP] for o in yaml.safe_load_all(out)] == [
        "scrape",
        "train",
    ]
    too_big = copy.deepcopy(example)
    too_big["spec"]["training"]["rank"] = 64  # the chart's vLLM takes at most 32
    for manifest, complaint in [
        (yaml.safe_dump(too_big), "--max-lora-rank 32"),
        ("kind: Pod\n", "not a DoppelUser"),
        ("a: [", "not YAML"),
    ]:
        code, out, err = dry_run(env, manifest)
        assert (code, out) == (2, "") and complaint in err and len(err.strip().splitlines()) == 1, err
