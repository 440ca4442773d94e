"""The pure reconciler facing a real cluster: what Job pods need, stuck pods, old versions pruned."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from tests.unit.test_reconcile import CONFIG, NOW, SPEC, observed, owner

from doppel.api import Adapter, DoppelUserStatus
from doppel.operator import jobs
from doppel.operator.reconcile import reconcile


def test_job_pods_get_what_a_real_cluster_needs():
    config = replace(
        CONFIG,
        image_pull_secrets=("regcred",),
        hf_home="/data/huggingface",
        hf_token_secret="hf",
        fs_group=10001,
        gpu_runtime_class="nvidia",
        deadlines_s={"scrape": 100, "train": 200},
    )
    train = jobs.job_manifest(owner(), "train", 1, ["doppel", "train"], SPEC, config)
    pod = train["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["securityContext"]["fsGroup"] == 10001 and pod["runtimeClassName"] == "nvidia"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_HOME"]["value"] == "/data/huggingface"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN", "optional": True}
    assert env["DOPPEL_REQUIRE_GPU"]["value"] == "1"
    assert train["spec"]["activeDeadlineSeconds"] == 200
    rule = train["spec"]["podFailurePolicy"]["rules"][0]
    assert rule == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    scrape = jobs.job_manifest(owner(), "scrape", 1, ["doppel", "scrape"], SPEC, config)
    pod = scrape["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert scrape["spec"]["activeDeadlineSeconds"] == 100
    assert "HF_TOKEN" not in {e["name"] for e in pod["containers"][0]["env"]}


def _running_train(pod_status: dict) -> dict:
    manifest = jobs.job_manifest(owner(), "train", 1, ["doppel", "train"], SPEC, CONFIG)
    job = json.loads(json.dumps(manifest))
    job["status"] = {"active": 1}
    created = (NOW - timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    job["_pods"] = [{"metadata": {"name": "p", "creationTimestamp": created}, "status": pod_status}]
    return job


def test_a_pod_that_cannot_start_is_reported_then_given_up():
    waiting = {"reason": "ErrImagePull", "message": "manifest unknown"}
    status = {"phase": "Pending", "containerStatuses": [{"name": "train", "state": {"waiting": waiting}}]}
    plan = reconcile(observed([_running_train(status)]), replace(CONFIG, pending_timeout_s=60))
    assert plan.status.reason == "ErrImagePull" and "manifest unknown" in plan.status.message
    assert plan.abandon == {} and plan.requeue_after is not None and plan.requeue_after <= 30
    plan = reconcile(observed([_running_train(status)]), replace(CONFIG, pending_timeout_s=20))
    (why,) = plan.abandon.values()
    assert why.startswith("ErrImagePull: manifest unknown") and plan.status.reason == "Retrying"
    # A Pending pod that is only being scheduled or pulled is nobody's problem yet.
    plan = reconcile(observed([_running_train({"phase": "Pending"})]), replace(CONFIG, pending_timeout_s=1))
    assert plan.abandon == {} and plan.status.phase == "Training" and plan.status.reason is None


def test_an_abandoned_job_counts_as_a_failed_attempt():
    job = _running_train({"phase": "Pending"})
    job["metadata"]["annotations"] = {jobs.A_ABANDONED: "Unschedulable: 0/1 nodes are available"}
    job["spec"]["suspend"] = True
    plan = reconcile(observed([job]), CONFIG)
    assert plan.status.reason == "Retrying" and "Unschedulable" in plan.status.message
    assert plan.status.retry_at is not None and plan.create == []


def test_once_a_version_serves_older_ones_and_leftovers_are_pruned():
    adapter = Adapter(
        served_name="team.alice.v5", path="/data/team/alice/adapters/v5", version=5, trained_at=NOW
    )
    status = DoppelUserStatus(phase="Ready", observed_generation=5, adapter=adapter)
    plan = reconcile(observed([], status, generation=5), replace(CONFIG, keep_adapters=1))
    (prune,) = plan.create
    command = prune["spec"]["template"]["spec"]["containers"][0]["command"]
    removed = [arg for arg in command if "/adapters/v" in arg]
    assert removed == [f"/data/team/alice/adapters/v{v}" for v in (1, 2, 3)]
    assert command[command.index("--partials-in") + 1] == "/data/team/alice"
    # Level-triggered: once the prune Job exists, no second one.
    again = reconcile(observed([json.loads(json.dumps(prune))], status, generation=5), CONFIG)
    assert again.create == []


def test_cleanup_removes_what_killed_runs_left(tmp_path: Path):
    adapters = tmp_path / "team" / "alice" / "adapters"
    (adapters / "v3").mkdir(parents=True)
    (adapters / ".v4.abc123.partial").mkdir()
    (adapters / ".v2.old-77").mkdir()
    (adapters / "v1").mkdir()
    # vLLM's resolver entries: one whose adapter is gone, one whose adapter is there.
    lora = tmp_path / "lora"
    for name, target in (("team.alice.v1", adapters / "v1" / "w"), ("team.alice.v3", adapters / "v3" / "w")):
        (lora / name).mkdir(parents=True)
        (lora / name / "adapter_model.safetensors").symlink_to(target)
    (adapters / "v3" / "w").write_text("weights")
    args = ["--data-root", str(tmp_path), "--partials-in", str(adapters), "--dangling-in", str(lora)]
    args.append(str(adapters / "v1"))
    proc = subprocess.run(
        [sys.executable, "-m", "doppel.cli", "cleanup", *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in adapters.iterdir()) == ["v3"]
    assert sorted(p.name for p in lora.iterdir()) == ["team.alice.v3"]


def test_a_generation_is_pruned_once_not_after_every_ttl():
    """The prune Job of a Ready version runs once: once it finished, the status records the generation, and
    the Job going after its ttlSecondsAfterFinished starts no other (nor does suspending and resuming)."""
    adapter = Adapter(served_name="team.alice.v2", path="/data/team/alice/adapters/v2", version=2)
    status = DoppelUserStatus(phase="Ready", observed_generation=2, adapter=adapter)
    (prune,) = reconcile(observed([], status, generation=2), CONFIG).create
    job = json.loads(json.dumps(prune))
    job["status"] = {"succeeded": 1}
    plan = reconcile(observed([job], status, generation=2, now=NOW + timedelta(minutes=1)), CONFIG)
    assert plan.create == [] and plan.status.pruned_generation == 2
    now, status = NOW, plan.status
    for hour in range(1, 4):  # the Job went after its TTL: nothing comes back, hour after hour
        now += timedelta(hours=hour)
        plan = reconcile(observed([], status, generation=2, now=now), CONFIG)
        assert plan.create == [] and plan.status.phase == "Ready"
        status = plan.status
    suspended = SPEC.model_copy(update={"suspend": True})
    plan = reconcile(observed([], status, generation=3, spec=suspended, now=now), CONFIG)
    plan = reconcile(observed([], plan.status, generation=4, now=now), CONFIG)
    assert plan.create == [] and plan.status.phase == "Ready"
