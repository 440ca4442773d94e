"""The pure reconciler: Jobs and status decided from what exists, the same way after any restart."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from doppel.api import ANNOTATION_DEACTIVATED, Adapter, DoppelUserSpec, DoppelUserStatus
from doppel.operator import jobs
from doppel.operator.conditions import condition, transitions
from doppel.operator.config import OperatorConfig
from doppel.operator.jobs import Owner
from doppel.operator.promotion import observe_serving, promote
from doppel.operator.reconcile import Observed, deactivation_unseen, queue_admits, reconcile

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CONFIG = OperatorConfig(data_root="/data", max_attempts=3, backoff_s=10)
SPEC = DoppelUserSpec.model_validate(
    {
        "slack": {"teamId": "T0001", "tokenSecretRef": {"name": "slack"}, "channels": {"include": ["gen"]}},
        "target": {"handle": "alice"},
        "baseModel": {"servedName": "tiny", "path": "/models/tiny"},
        "training": {"rank": 8, "maxSteps": 3},
        "nodeSelector": {"gpu": "yes"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
)


def owner(generation: int = 1) -> Owner:
    return Owner(namespace="team", name="alice", uid="0123456789abcdef", generation=generation)


def observed(
    jobs_: list[dict[str, Any]] = (),
    status: DoppelUserStatus | None = None,
    *,
    generation: int = 1,
    now: datetime = NOW,
    **kwargs: Any,
) -> Observed:
    pods = {j["metadata"]["name"]: j.pop("_pods") for j in jobs_ if "_pods" in j}
    return Observed(
        owner=owner(generation),
        spec=kwargs.pop("spec", SPEC),
        status=status or DoppelUserStatus(),
        jobs=list(jobs_),
        pods=pods,
        now=now,
        **kwargs,
    )


def finished(manifest: dict[str, Any], ok: bool, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Job as the Job controller leaves it, with its pod's termination message."""
    job = json.loads(json.dumps(manifest))
    job["status"] = {"succeeded": 1} if ok else {"failed": 1}
    message = json.dumps(result if result is not None else {"ok": ok})
    job["_pods"] = [{"status": {"containerStatuses": [{"state": {"terminated": {"message": message}}}]}}]
    return job


def test_first_reconcile_creates_the_scrape_job_with_owner_and_secret():
    plan = reconcile(observed(), CONFIG)
    (job,) = plan.create
    assert job["metadata"]["name"] == jobs.job_name(owner(), "scrape", 1)
    assert job["metadata"]["ownerReferences"][0]["uid"] == owner().uid
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["doppel", "scrape"] and "/data/team/alice/g1" in command
    # spec.data left out: the defaults, the newest 2,000 samples among them.
    assert command[command.index("--max-samples") + 1] == "2000"
    env = {e["name"]: e for e in container["env"]}
    assert env["DOPPEL_RESULT_FILE"]["value"] == "/dev/termination-log"
    assert env["SLACK_BOT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "slack", "key": "token"}
    assert plan.status.phase == "Scraping" and plan.status.observed_generation == 1
    # Deterministic: the same observations give the same Job again (a restart re-creates nothing new).
    assert reconcile(observed(), CONFIG).create == plan.create


def test_running_job_is_never_duplicated():
    scrape = jobs.job_manifest(owner(), "scrape", 1, ["doppel", "scrape"], SPEC, CONFIG)
    plan = reconcile(observed([scrape]), CONFIG)
    assert plan.create == [] and plan.status.phase == "Scraping"


def test_scrape_success_starts_training_with_gpu_and_placement():
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    plan = reconcile(observed([finished(scrape, True, {"ok": True, "samples": 42})]), CONFIG)
    (train,) = plan.create
    assert train["metadata"]["name"] == jobs.job_name(owner(), "train", 1)
    pod = train["spec"]["template"]["spec"]
    # Burstable, never BestEffort: CPU and memory requested (the cluster's floor here), memory capped there.
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "8Gi"},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"},
    }
    assert pod["nodeSelector"] == {"gpu": "yes"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    command = pod["containers"][0]["command"]
    assert command[:2] == ["doppel", "train"] and "--json-progress" in command
    assert command[command.index("--rank") + 1] == "8"
    assert plan.status.samples == 42 and condition(plan.status, "Scraped").status == "True"
    assert plan.status.phase == "Training"


def test_full_training_queue_keeps_the_object_pending_queued():
    scrape = finished(
        jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG), True, {"ok": True, "samples": 5}
    )
    plan = reconcile(observed([scrape], may_train=lambda: False), CONFIG)
    assert plan.create == []
    assert (plan.status.phase, plan.status.reason) == ("Pending", "Queued")
    assert plan.status.queued_at == NOW
    # Waiting keeps its place: queued_at is not moved by later reconciles.
    scrape2 = finished(jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG), True, {"ok": True})
    later = reconcile(
        observed([scrape2], plan.status, now=NOW + timedelta(minutes=5), may_train=lambda: False), CONFIG
    )
    assert later.status.queued_at == NOW


def test_queue_is_first_come_first_served():
    t = [NOW + timedelta(seconds=i) for i in range(3)]
    queued = [(t[2], "c"), (t[0], "a"), (t[1], "b")]
    assert queue_admits("a", queued, running=0, limit=1)
    assert not queue_admits("b", queued, running=0, limit=1)
    assert queue_admits("b", queued, running=0, limit=2)
    assert not queue_admits("a", queued, running=1, limit=1)


def test_bad_input_fails_at_once_with_the_reason():
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    result = {"ok": False, "kind": "bad_input", "reason": "unknown user 'alice'; candidates: alicia"}
    plan = reconcile(observed([finished(scrape, False, result)]), CONFIG)
    assert plan.create == [] and plan.requeue_after is None
    assert plan.status.phase == "Failed" and plan.status.reason == "BadInput"
    assert "unknown user 'alice'" in plan.status.message
    assert condition(plan.status, "Scraped").reason == "BadInput"


def test_transient_failure_retries_after_backoff_then_gives_up():
    scrape1 = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    failed1 = finished(scrape1, False, {"ok": False, "kind": "error", "reason": "ConnectError"})
    plan = reconcile(observed([failed1]), CONFIG)
    assert plan.create == [] and plan.status.reason == "Retrying"
    assert plan.requeue_after == 10 and plan.status.retry_at == NOW + timedelta(seconds=10)
    # Before the backoff elapses: nothing; after it: attempt 2.
    failed1 = finished(scrape1, False, {"ok": False, "kind": "error", "reason": "ConnectError"})
    early = reconcile(observed([failed1], plan.status, now=NOW + timedelta(seconds=5)), CONFIG)
    assert early.create == []
    failed1 = finished(scrape1, False, {"ok": False, "kind": "error", "reason": "ConnectError"})
    due = reconcile(observed([failed1], plan.status, now=NOW + timedelta(seconds=11)), CONFIG)
    assert [j["metadata"]["name"] for j in due.create] == [jobs.job_name(owner(), "scrape", 2)]
    # The last allowed attempt failing ends in Failed (RetriesExhausted).
    scrape3 = jobs.job_manifest(owner(), "scrape", 3, [], SPEC, CONFIG)
    last = reconcile(
        observed([finished(scrape3, False, {"ok": False, "kind": "error", "reason": "boom"})]), CONFIG
    )
    assert (last.status.phase, last.status.reason) == ("Failed", "RetriesExhausted")


def test_failed_pod_without_message_is_transient():
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    job = json.loads(json.dumps(scrape))
    job["status"] = {"failed": 1}
    job["_pods"] = [{"status": {"containerStatuses": [{"state": {"terminated": {"reason": "OOMKilled"}}}]}}]
    plan = reconcile(observed([job]), CONFIG)
    assert plan.status.reason == "Retrying" and "OOMKilled" in plan.status.message


def test_missing_secret_is_a_condition_not_a_job():
    plan = reconcile(observed(secret_problem="Secret team/slack not found"), CONFIG)
    assert plan.create == [] and plan.requeue_after
    assert plan.status.reason == "SecretMissing"
    assert condition(plan.status, "Scraped").message == "Secret team/slack not found"


def test_trained_adapter_is_registered_before_it_becomes_current():
    train = jobs.job_manifest(owner(), "train", 1, [], SPEC, CONFIG)
    result = {"ok": True, "steps": 3, "train_loss": 2.5, "adapter_eval_loss": 2.0, "base_eval_loss": 4.0}
    plan = reconcile(observed([finished(train, True, result)]), CONFIG)
    assert plan.register is not None and plan.status.adapter is None
    assert plan.register.served_name == "team.alice.v1"
    assert plan.register.path == "/data/team/alice/adapters/v1"
    assert plan.status.phase == "Registering" and plan.status.training.eval_loss == 2.0
    # Raw data removed after training by default: a cleanup Job for the dataset directory.
    (cleanup,) = plan.create
    assert cleanup["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "/data/team/alice/g1"
    kept = SPEC.model_copy(update={"retention": SPEC.retention.model_copy(update={"after_training": "Keep"})})
    train2 = jobs.job_manifest(owner(), "train", 1, [], SPEC, CONFIG)
    assert reconcile(observed([finished(train2, True, result)], spec=kept), CONFIG).create == []

    nowhere, old = promote(plan.status, [], {}, NOW)
    assert nowhere.adapter is None and nowhere.reason == "NoVllmPods" and old is None
    ready, old = promote(plan.status, ["vllm-0"], {}, NOW)
    assert ready.phase == "Ready" and ready.adapter.version == 1 and ready.served_by == ["vllm-0"]
    assert ready.pending_adapter is None and old is None


def test_fidelity_headline_of_the_train_job_goes_into_status_eval():
    """`doppel train` reports eval.json's headline in its summary; the status carries it (and /doppel status
    shows it); a summary without one, or with figures out of range, leaves status.eval empty."""
    train = jobs.job_manifest(owner(), "train", 1, [], SPEC, CONFIG)
    headline = {
        "heldout_loss_base": 2.9, "heldout_loss_adapter": 0.8, "likeness_adapter": 0.92,
        "likeness_prompted_base": 0.08, "likeness_classifier_accuracy": 0.95, "heldout_samples": 13,
    }  # fmt: skip
    result = {"ok": True, "steps": 3, "eval": headline}
    plan = reconcile(observed([finished(train, True, result)]), CONFIG)
    assert plan.status.eval.likeness_adapter == 0.92
    assert plan.status.model_dump(by_alias=True, mode="json")["eval"]["likenessPromptedBase"] == 0.08
    from doppel.bot.logic import describe

    doppel = {"metadata": {"name": "alice"}, "status": plan.status.model_dump(by_alias=True, mode="json")}
    assert "likeness 0.92 (persona prompt 0.08)" in describe(doppel)
    for bad in ({"ok": True, "steps": 3}, {"ok": True, "eval": {**headline, "likeness_adapter": 7}}):
        again = jobs.job_manifest(owner(), "train", 1, [], SPEC, CONFIG)
        assert reconcile(observed([finished(again, True, bad)]), CONFIG).status.eval is None


def test_new_generation_retrains_while_the_old_adapter_keeps_serving():
    v1 = Adapter(served_name="team.alice.v1", path="/data/team/alice/adapters/v1", version=1)
    ready = DoppelUserStatus(phase="Ready", observed_generation=1, adapter=v1, served_by=["vllm-0"])
    plan = reconcile(observed([], ready, generation=2), CONFIG)
    assert plan.status.adapter == v1 and plan.status.observed_generation == 2
    assert [j["metadata"]["name"] for j in plan.create] == [jobs.job_name(owner(2), "scrape", 1)]
    # When v2 is loaded everywhere, the status switches and v1 is handed back for unloading.
    plan.status.pending_adapter = Adapter(served_name="team.alice.v2", path="/p2", version=2)
    partial, old = promote(plan.status, ["vllm-0"], {"vllm-1": "unreachable"}, NOW)
    assert partial.adapter == v1 and old is None and partial.reason == "VllmUnreachable"
    switched, old = promote(plan.status, ["vllm-0", "vllm-1"], {}, NOW)
    assert switched.adapter.version == 2 and old == v1


def test_suspend_starts_nothing():
    spec = SPEC.model_copy(update={"suspend": True})
    plan = reconcile(observed(spec=spec), CONFIG)
    assert plan.create == [] and plan.status.reason == "Suspended"


def test_a_deactivated_person_gets_no_job_and_no_serving_until_active_again():
    v1 = Adapter(served_name="team.alice.v1", path="/p", version=1)
    ready = DoppelUserStatus(phase="Ready", observed_generation=1, adapter=v1, served_by=["vllm-0"])
    # A new spec would retrain, a ready adapter serve: neither happens; the adapter is unloaded once.
    plan = reconcile(observed([], ready, generation=2, person_deactivated=True), CONFIG)
    assert plan.create == [] and plan.unload == v1 and not plan.active
    gone = plan.status
    assert gone.served_by == [] and gone.reason == "Deactivated"
    assert condition(gone, "PersonActive").reason == "Deactivated"
    assert condition(gone, "Ready").status == "False"
    again = reconcile(observed([], gone, generation=2, person_deactivated=True), CONFIG)
    assert again.unload is None and again.create == []
    # The annotation goes: PersonActive again, and generation 2 is scraped.
    back = reconcile(observed([], gone, generation=2), CONFIG)
    assert condition(back.status, "PersonActive").status == "True" and back.active
    assert [j["metadata"]["name"] for j in back.create] == [jobs.job_name(owner(2), "scrape", 1)]
    assert deactivation_unseen(ready, {ANNOTATION_DEACTIVATED: "true"})
    assert not deactivation_unseen(gone, {ANNOTATION_DEACTIVATED: "true"})
    assert deactivation_unseen(gone, {}) and not deactivation_unseen(ready, None)


def test_serving_drift_and_events():
    v1 = Adapter(served_name="team.alice.v1", path="/p", version=1)
    ready = DoppelUserStatus(phase="Ready", observed_generation=1, adapter=v1, served_by=["vllm-0"])
    lost = observe_serving(ready, [], {"vllm-0": "connection refused"}, NOW)
    assert condition(lost, "Ready").status == "False" and lost.served_by == []
    back = observe_serving(lost, ["vllm-0"], {}, NOW + timedelta(seconds=1))
    assert condition(back, "Ready").status == "True"
    assert ("Normal", "ReadyTrue", "Serving: answering as team.alice.v1") in transitions(lost, back)
    failed = DoppelUserStatus(phase="Failed", reason="BadInput", message="unknown user")
    assert transitions(DoppelUserStatus(), failed)[0][:2] == ("Warning", "BadInput")


def test_job_names_fit_label_limits_and_stay_distinct():
    long_a = Owner(namespace="n", name="a" * 80 + "x", uid="u" * 36, generation=12)
    long_b = Owner(namespace="n", name="a" * 80 + "y", uid="u" * 36, generation=12)
    name_a, name_b = jobs.job_name(long_a, "train", 10), jobs.job_name(long_b, "train", 10)
    assert len(name_a) <= 63 and name_a != name_b and name_a.endswith("-g12-train-10")


def test_scrub_is_on_unless_the_spec_turns_it_off():
    """`spec.data.scrub: false` reaches the scrape Job as `--no-scrub`, an option `doppel scrape` knows."""
    from click.testing import CliRunner

    from doppel.cli import main

    assert "--no-scrub" not in jobs.scrape_command(SPEC, CONFIG, owner())
    off = SPEC.model_copy(update={"data": SPEC.data.model_copy(update={"scrub": False})})
    command = jobs.scrape_command(off, CONFIG, owner())
    assert "--no-scrub" in command
    assert "--no-scrub" in CliRunner().invoke(main, ["scrape", "--help"]).output


def test_the_scrape_job_chooses_the_person_s_length_unless_the_spec_gives_one():
    """Without `spec.data.minLength` the scrape Job passes no --min-length: the person's median decides."""
    assert SPEC.data.min_length is None and "--min-length" not in jobs.scrape_command(SPEC, CONFIG, owner())
    given = SPEC.model_copy(update={"data": SPEC.data.model_copy(update={"min_length": 40})})
    command = jobs.scrape_command(given, CONFIG, owner())
    assert command[command.index("--min-length") + 1] == "40"


def test_a_retrained_adapter_worse_on_the_same_held_out_set_is_not_promoted():
    """The fidelity gate: v2's report against v1's on v2's held-out replies (doppel train --compare-with)."""
    from doppel.bot.logic import describe
    from doppel.operator.conditions import condition, transitions

    v1 = Adapter(served_name="team.alice.v1", path="/data/team/alice/adapters/v1", version=1)
    ready = DoppelUserStatus(phase="Ready", observed_generation=2, adapter=v1, served_by=["vllm-0"])
    # The train Job of generation 2 measures the serving v1 on the same held-out set.
    command = jobs.train_command(SPEC, CONFIG, owner(2), v1.path)
    assert command[command.index("--compare-with") + 1] == v1.path
    train = jobs.job_manifest(owner(2), "train", 1, command, SPEC, CONFIG)
    serving = {"heldout_loss_adapter": 2.1, "likeness_adapter": 0.62, "distinct_adapter": 0.9}
    worse = {"heldout_loss_adapter": 2.3, "likeness_adapter": 0.31, "distinct_adapter": 0.88}
    result = {"ok": True, "steps": 3, "eval": worse, "eval_serving": serving}
    plan = reconcile(observed([finished(train, True, result)], ready, generation=2), CONFIG)
    assert plan.status.adapter == v1 and plan.status.pending_adapter is None and plan.register is None
    assert (plan.status.phase, plan.status.reason) == ("Ready", "FidelityRegressed")
    promoted = condition(plan.status, "Promoted")
    assert promoted.status == "False" and promoted.reason == "FidelityRegressed"
    assert (
        "held-out loss 2.300 > 2.100 serving" in promoted.message
        and "likeness 0.31 < 0.62" in promoted.message
    )
    assert "distinct" not in promoted.message  # within its tolerance
    assert any(
        kind == "Warning" and "FidelityRegressed" in msg for kind, _, msg in transitions(ready, plan.status)
    )
    doppel = {"metadata": {"name": "alice"}, "status": plan.status.model_dump(by_alias=True, mode="json")}
    assert "kept v1: retrained v2 is worse" in describe(doppel)

    # Not worse beyond the tolerances: promoted; worse but forced by the spec: promoted, and said so.
    close = {"ok": True, "eval": {**serving, "likeness_adapter": 0.57}, "eval_serving": serving}
    plan = reconcile(observed([finished(train, True, close)], ready, generation=2), CONFIG)
    assert plan.register is not None and plan.register.version == 2
    assert condition(plan.status, "Promoted").reason == "NotWorse"
    forced = SPEC.model_copy(update={"training": SPEC.training.model_copy(update={"force_promotion": True})})
    plan = reconcile(observed([finished(train, True, result)], ready, generation=2, spec=forced), CONFIG)
    assert plan.register is not None and condition(plan.status, "Promoted").reason == "Forced"

    # The train Job judged reply by reply (its result's gate_regressions): its verdict, not the headlines'.
    judged = {**result, "gate_regressions": []}
    plan = reconcile(observed([finished(train, True, judged)], ready, generation=2), CONFIG)
    assert plan.register is not None and condition(plan.status, "Promoted").reason == "NotWorse"
    noise = "likeness 0.50 < 0.62 serving (6 replies no longer taken for the person's, 0 newly; p=0.016)"
    judged = {**close, "gate_regressions": [noise]}
    plan = reconcile(observed([finished(train, True, judged)], ready, generation=2), CONFIG)
    assert plan.register is None and noise in condition(plan.status, "Promoted").message


def test_a_volume_the_job_could_not_write_says_storage_writable_false_then_true():
    """A Job's storage failure (`doppel` reports kind "storage") is retried like any failure and also sets
    StorageWritable=False with the Job's own words; the next successful scrape sets it True."""
    why = "cannot write /data/team: permission denied (Permission denied), as uid 10001 gid 10001: ..."
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    failed = finished(scrape, False, {"ok": False, "kind": "storage", "reason": why})
    plan = reconcile(observed([failed]), CONFIG)
    storage = condition(plan.status, "StorageWritable")
    assert (storage.status, storage.reason, storage.message) == ("False", "NotWritable", why)
    assert plan.status.reason == "Retrying" and why in plan.status.message
    later = NOW + timedelta(hours=1)
    retry = reconcile(observed([failed], plan.status, now=later), CONFIG)
    (second,) = retry.create
    done = finished(second, True, {"ok": True, "samples": 9})
    plan = reconcile(observed([failed, done], retry.status, now=later), CONFIG)
    assert condition(plan.status, "StorageWritable").status == "True"


def test_jobs_gone_after_their_ttl_change_nothing_the_status_remembers():
    """ttlSecondsAfterFinished deletes finished Jobs: a scraped object waiting in the training queue does
    not scrape again once its scrape Job is gone, and a failed one stays failed."""
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    done = finished(scrape, True, {"ok": True, "samples": 42})
    queued = reconcile(observed([done], may_train=lambda: False), CONFIG)
    assert queued.status.reason == "Queued"
    later = reconcile(observed([], queued.status, may_train=lambda: False), CONFIG)
    assert later.create == [] and later.status.reason == "Queued"
    (train,) = reconcile(observed([], queued.status), CONFIG).create
    assert train["metadata"]["labels"][jobs.L_STEP] == "train"

    bad = finished(scrape, False, {"ok": False, "kind": "bad_input", "reason": "no such user"})
    failed = reconcile(observed([bad]), CONFIG)
    assert failed.status.phase == "Failed"
    gone = reconcile(observed([], failed.status), CONFIG)
    assert gone.create == [] and gone.status.phase == "Failed" and "no such user" in gone.status.message


def test_the_train_job_leaves_the_learning_rate_to_the_base_model_unless_the_spec_gives_one():
    """Without `spec.training.learningRate` the train Job passes no --lr: `doppel train` takes the base
    model's own (SmolLM2 learns best at ten times the rate of a billion-parameter model)."""
    assert SPEC.training.learning_rate is None and "--lr" not in jobs.train_command(SPEC, CONFIG, owner())
    given = SPEC.model_copy(update={"training": SPEC.training.model_copy(update={"learning_rate": 0.002})})
    command = jobs.train_command(given, CONFIG, owner())
    assert command[command.index("--lr") + 1] == "0.002"


def _gone(plan_status: DoppelUserStatus, step: str, attempt: int, ok: bool, result: dict[str, Any], now):
    """The Job of `step` and `attempt` ends as `ok` says, is seen once, then goes (its TTL): the status
    the operator has left to go on from."""
    job = finished(jobs.job_manifest(owner(), step, attempt, [], SPEC, CONFIG), ok, result)
    return reconcile(observed([job], plan_status, now=now), CONFIG).status


def test_failed_attempts_count_after_their_jobs_went():
    """ttlSecondsAfterFinished deletes a failed Job during its backoff: the next attempt is the next one,
    not the first again, and the last one fails the object for good."""
    scrape = finished(jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG), True, {"ok": True})
    status, now = reconcile(observed([scrape]), CONFIG).status, NOW
    started = []
    for attempt in (1, 2, 3):  # CONFIG.max_attempts
        assert status.last_job is not None and status.last_job.attempt == attempt
        status = _gone(status, "train", attempt, False, {"ok": False, "reason": "CUDA error"}, now)
        assert status.last_job.outcome == "Failed" and status.last_job.reason == "CUDA error"
        now = (status.retry_at or now) + timedelta(seconds=1)
        plan = reconcile(observed([], status, now=now), CONFIG)
        started += [j["metadata"]["name"] for j in plan.create]
        status = plan.status
    assert started == [jobs.job_name(owner(), "train", 2), jobs.job_name(owner(), "train", 3)]
    assert (status.phase, status.reason) == ("Failed", "RetriesExhausted") and "CUDA error" in status.message
    later = reconcile(observed([], status, now=now + timedelta(hours=5)), CONFIG)
    assert later.create == [] and later.status.phase == "Failed"
    # Within the backoff, the Job gone: still waiting for the same retry time.
    fresh = reconcile(observed([scrape]), CONFIG).status
    waiting = _gone(fresh, "train", 1, False, {"ok": False, "reason": "CUDA error"}, NOW)
    plan = reconcile(observed([], waiting, now=NOW + timedelta(seconds=2)), CONFIG)
    assert plan.create == [] and plan.status.reason == "Retrying" and plan.status.retry_at == waiting.retry_at


def test_a_train_whose_outcome_was_seen_never_runs_again_once_its_job_went():
    """A retrain kept out by the fidelity gate (its Job succeeded, the serving adapter stays) is not
    retrained when its Job goes; a Job that went before anyone saw how it ended runs again as the same
    attempt, not as the first."""
    v1 = Adapter(served_name="team.alice.v1", path="/data/team/alice/adapters/v1", version=1)
    ready = DoppelUserStatus(phase="Ready", observed_generation=2, adapter=v1, served_by=["vllm-0"])
    scrape = jobs.job_manifest(owner(2), "scrape", 1, [], SPEC, CONFIG)
    done = finished(scrape, True, {"ok": True, "samples": 9})
    status = reconcile(observed([done], ready, generation=2), CONFIG).status
    train = jobs.job_manifest(owner(2), "train", 1, [], SPEC, CONFIG)
    serving = {"heldout_loss_adapter": 2.1, "likeness_adapter": 0.62}
    worse = {
        "ok": True,
        "eval": {"heldout_loss_adapter": 2.9, "likeness_adapter": 0.2},
        "eval_serving": serving,
    }
    kept = reconcile(observed([done, finished(train, True, worse)], status, generation=2), CONFIG).status
    assert (kept.phase, kept.reason) == ("Ready", "FidelityRegressed")
    later = reconcile(observed([], kept, generation=2, now=NOW + timedelta(hours=2)), CONFIG)
    assert later.create == [] and (later.status.phase, later.status.reason) == ("Ready", "FidelityRegressed")

    # Attempt 2 ran while no operator looked, and went: attempt 2 again (the count is not reset).
    fresh = reconcile(observed([done]), CONFIG).status
    failed = _gone(fresh, "train", 1, False, {"ok": False, "reason": "CUDA error"}, NOW)
    second = reconcile(observed([], failed, now=failed.retry_at), CONFIG)
    assert [j["metadata"]["name"] for j in second.create] == [jobs.job_name(owner(), "train", 2)]
    again = reconcile(observed([], second.status, now=NOW + timedelta(hours=3)), CONFIG)
    assert [j["metadata"]["name"] for j in again.create] == [jobs.job_name(owner(), "train", 2)]
    assert "went before its outcome was seen" in again.status.message


def test_suspend_and_resume_leave_a_ready_doppel_as_it_was():
    """`spec.suspend` bumps metadata.generation but is no new work: a Ready doppel keeps serving, its
    status says Suspended, and resuming starts nothing (the bot suspends and resumes a workspace's doppels
    when the app is uninstalled and installed again)."""
    v1 = Adapter(served_name="team.alice.v1", path="/data/team/alice/adapters/v1", version=1)
    ready = reconcile(
        observed([], DoppelUserStatus(phase="Ready", observed_generation=1, adapter=v1)), CONFIG
    )
    assert ready.status.spec_generation == 1 and ready.status.reason is None
    suspended = SPEC.model_copy(update={"suspend": True})
    plan = reconcile(observed([], ready.status, generation=2, spec=suspended), CONFIG)
    assert plan.create == [] and plan.delete == [] and plan.status.adapter == v1
    assert (plan.status.phase, plan.status.reason) == ("Ready", "Suspended")
    assert plan.status.observed_generation == 2 and plan.status.spec_generation == 1
    resumed = reconcile(observed([], plan.status, generation=3), CONFIG)
    assert resumed.create == [] and (resumed.status.phase, resumed.status.reason) == ("Ready", None)
    assert condition(resumed.status, "Trained") == condition(ready.status, "Trained")
    # A real change (suspended or not) is a new generation: it scrapes and trains again.
    changed = SPEC.model_copy(update={"training": SPEC.training.model_copy(update={"rank": 4})})
    plan = reconcile(observed([], resumed.status, generation=4, spec=changed), CONFIG)
    assert [j["metadata"]["name"] for j in plan.create] == [jobs.job_name(owner(4), "scrape", 1)]


def test_suspend_lets_a_running_training_finish_and_starts_nothing_new():
    scrape = finished(jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG), True, {"ok": True})
    status = reconcile(observed([scrape]), CONFIG).status
    train = jobs.job_manifest(owner(), "train", 1, [], SPEC, CONFIG)  # running
    suspended = SPEC.model_copy(update={"suspend": True})
    plan = reconcile(observed([scrape, train], status, generation=2, spec=suspended), CONFIG)
    assert plan.delete == [] and plan.create == [] and plan.status.phase == "Training"
    # It fails while suspended: no retry starts until resumed, then attempt 2.
    failed = finished(train, False, {"ok": False, "reason": "CUDA error"})
    later = NOW + timedelta(hours=1)
    plan = reconcile(observed([scrape, failed], plan.status, generation=2, spec=suspended, now=later), CONFIG)
    later = plan.status.retry_at
    plan = reconcile(observed([scrape, failed], plan.status, generation=2, spec=suspended, now=later), CONFIG)
    assert plan.create == [] and plan.status.reason == "Suspended"
    plan = reconcile(observed([scrape, failed], plan.status, generation=3, now=later), CONFIG)
    assert [j["metadata"]["name"] for j in plan.create] == [jobs.job_name(owner(), "train", 2)]
    # It succeeds while suspended: registered as usual (no Job needed), version 1.
    done = finished(train, True, {"ok": True})
    plan = reconcile(observed([scrape, done], status, generation=2, spec=suspended), CONFIG)
    assert plan.register is not None and plan.register.version == 1 and plan.status.phase == "Registering"


def test_a_finished_job_gets_its_ttl_only_once_the_status_holds_its_outcome():
    """Jobs start without ttlSecondsAfterFinished; the plan names a finished one for its TTL only when the
    status it publishes holds that outcome (or nothing reads it any more). A Job of an earlier operator
    version, TTL set at creation, is left as it is; a purge Job goes with its DoppelUser."""
    scrape = jobs.job_manifest(owner(), "scrape", 1, [], SPEC, CONFIG)
    assert "ttlSecondsAfterFinished" not in scrape["spec"]
    started = reconcile(observed([json.loads(json.dumps(scrape))]), CONFIG)
    assert started.expire == []  # still running
    done = finished(scrape, True, {"ok": True, "samples": 9})
    plan = reconcile(observed([done]), CONFIG)  # scraped, and the train Job starts: lastJob says so
    assert (plan.status.last_job.step, plan.status.samples) == ("train", 9)
    assert plan.expire == [scrape["metadata"]["name"]]
    queued = reconcile(observed([finished(scrape, True)], may_train=lambda: False), CONFIG)
    assert queued.status.last_job.outcome == "Succeeded" and queued.expire == [scrape["metadata"]["name"]]

    # The person is deactivated: the status is not brought up to date, so the Job stays the only witness.
    away = reconcile(observed([finished(scrape, True)], started.status, person_deactivated=True), CONFIG)
    assert away.status.last_job.outcome == "Running" and away.expire == []

    # Created by an earlier version with its TTL: the status records it, nothing is patched.
    old = finished({**scrape, "spec": {**scrape["spec"], "ttlSecondsAfterFinished": 3600}}, True)
    plan = reconcile(observed([old]), CONFIG)
    assert plan.expire == [] and [j["metadata"]["labels"][jobs.L_STEP] for j in plan.create] == ["train"]

    # Superseded attempts and steps, and any Job of an earlier generation, go; purge Jobs never do.
    train = jobs.job_manifest(owner(2), "train", 1, [], SPEC, CONFIG)
    purge = finished(jobs.job_manifest(owner(2), "purge", 1, [], SPEC, CONFIG), True)
    failed = finished(jobs.job_manifest(owner(2), "scrape", 1, [], SPEC, CONFIG), False, {"ok": False})
    retried = finished(jobs.job_manifest(owner(2), "scrape", 2, [], SPEC, CONFIG), True, {"ok": True})
    plan = reconcile(observed([finished(scrape, True), failed, retried, train, purge], generation=2), CONFIG)
    assert plan.status.phase == "Training"
    names = [j["metadata"]["name"] for j in (scrape, failed, retried)]
    assert plan.expire == names
