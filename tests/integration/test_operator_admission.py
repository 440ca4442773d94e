"""What a Job's Events say when its pod cannot start, driven the way a cluster does it (the emulator plays
the Job controller, kubelet and cluster autoscaler, with their real reasons and messages):

- admission refuses the pod (quota, Pod Security, a webhook): the Job has no pod, only FailedCreate
  Events; the DoppelUser says so, in the API server's words, within one reconcile, and no further Job is
  created while the Job controller retries; once allowed, the same Job's pod runs;
- a pod stuck in ContainerCreating on a volume (FailedMount, Multi-Attach) reads as stuck and times out;
- an Unschedulable pod for which the cluster autoscaler triggered a scale-up is not timed out meanwhile.
"""

from __future__ import annotations

import asyncio

from tests.integration.test_operator_cluster import NO_GPU, phase, started, step_jobs
from tests.integration.test_operator_conditions import cond, doppeluser, reason

QUOTA = (
    "exceeded quota: team-quota, requested: requests.memory=256Mi, used: requests.memory=8Gi, "
    "limited: requests.memory=8Gi"
)
MULTI_ATTACH = (
    'Multi-Attach error for volume "pvc-3f1c" Volume is already used by pod(s) doppel-vllm-7d9f8-abcde'
)
SCALE_UP = "pod triggered scale-up: [{gpu-pool 1->2 (max: 4)}]"


async def test_refused_pods_become_a_condition_with_the_apis_message_then_heal(
    kube, operator_config, slack_emulator
):
    refused = kube.jobs.refuse_pods("scrape", QUOTA)
    operator = await started(kube, operator_config, slack_emulator, progress_s=0.5)
    try:
        await kube.kubectl.create(doppeluser("quota"))
        obj = await kube.wait_for("quota", lambda o: reason(o) == "FailedCreate", 30, "FailedCreate")
        assert phase(obj) == "Scraping" and cond(obj, "Scraped")["reason"] == "FailedCreate"
        assert QUOTA in cond(obj, "Scraped")["message"] and "forbidden" in obj["status"]["message"]
        await asyncio.sleep(2)  # several reconciles: the Job controller retries, the operator adds nothing
        assert len(step_jobs(kube, "scrape")) == 1
        refused.clear()  # the quota is raised: the same Job's pod is created and runs
        obj = await kube.wait_for(
            "quota", lambda o: cond(o, "Scraped").get("status") == "True", 60, "scraped"
        )
        assert len(step_jobs(kube, "scrape")) == 1
    finally:
        await operator.stop()


async def test_a_pod_stuck_on_its_volume_is_reported_and_given_up(kube, operator_config, slack_emulator):
    stuck = kube.jobs.stick("scrape", "ContainerCreating", "")
    operator = await started(kube, operator_config, slack_emulator, progress_s=0.5, pending_timeout_s=4.0)
    try:
        await kube.kubectl.create(doppeluser("mount"))
        while not kube.jobs.current_pod("scrape"):
            await asyncio.sleep(0.1)
        pod = kube.jobs.current_pod("scrape")
        await kube.jobs.event("Pod", pod, "FailedAttachVolume", MULTI_ATTACH, "attachdetach-controller")
        obj = await kube.wait_for(
            "mount", lambda o: reason(o) == "FailedAttachVolume", 30, "stuck on its volume"
        )
        assert MULTI_ATTACH in cond(obj, "Scraped")["message"]
        obj = await kube.wait_for("mount", lambda o: reason(o) == "Retrying", 30, "given up")
        assert "FailedAttachVolume" in obj["status"]["message"] and "Pending for" in obj["status"]["message"]
    finally:
        stuck.clear()
        await operator.stop()


async def test_a_scale_up_in_progress_is_waited_for(kube, operator_config, slack_emulator):
    stuck = kube.jobs.stick("scrape", "Unschedulable", NO_GPU)
    operator = await started(kube, operator_config, slack_emulator, progress_s=0.5, pending_timeout_s=6.0)
    try:
        await kube.kubectl.create(doppeluser("scale"))
        while not kube.jobs.current_pod("scrape"):
            await asyncio.sleep(0.1)
        pod = kube.jobs.current_pod("scrape")
        await kube.wait_for("scale", lambda o: reason(o) == "Unschedulable", 30, "Unschedulable")
        await asyncio.sleep(3.5)  # then the autoscaler adds a node
        await kube.jobs.event("Pod", pod, "TriggeredScaleUp", SCALE_UP, "cluster-autoscaler")
        obj = await kube.wait_for("scale", lambda o: SCALE_UP in (o["status"].get("message") or ""), 30)
        assert reason(obj) == "Unschedulable"
        # Past the limit counted from the pod's creation (second-precise timestamps), not from the scale-up.
        await asyncio.sleep(3.5)
        obj = await kube.kubectl.get("DoppelUser", "scale")
        assert reason(obj) == "Unschedulable" and len(step_jobs(kube, "scrape")) == 1, obj["status"]
        stuck.clear()  # the new node is up: the pod is scheduled and runs
        await kube.wait_for("scale", lambda o: cond(o, "Scraped").get("status") == "True", 60, "scraped")
        assert len(step_jobs(kube, "scrape")) == 1
    finally:
        await operator.stop()
