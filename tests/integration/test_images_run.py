"""The images, built and run (opt-in: DOPPEL_IMAGE_TESTS=1, or `make image-tests`; minutes and GBs).

images/build.sh builds the app image, the CPU worker and the train worker (with a CPU build of torch:
DOPPEL_IMAGE_TORCH_PIP_ARGS, default PyTorch's CPU index; DOPPEL_IMAGE_BUILD_VOLUMES mounts a local wheel
directory into the build) on the Debian base it makes with mmdebstrap, with podman (or docker where its
daemon answers). Then each runs as a pod would run it: as the image's own non-root user, with a read-only
root filesystem and a /tmp of its own, no capabilities, no privilege escalation, on the host's network
(where the test's Slack and Kubernetes emulators listen):

- the bot answers a signed Slack event (in the Slack emulator's channel);
- the operator, with the environment the chart gives it, starts against the Kubernetes emulator, answers
  its liveness probe and creates a scrape Job whose pod passes Pod Security "restricted";
- the CPU worker scrapes the Slack emulator onto a mounted volume only its user may write (as on NFS with
  root_squash, where nothing can chown);
- the train worker trains the tiny model on CPU and writes the adapter onto that volume.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from tests.support.bot_fixtures import (
    BOT_NAMESPACE,
    CHANNEL,
    NAMESPACE,
    SIGNING_SECRET,
    TEAM_ID,
    doppel_body,
    kube_for,
    mention_payload,
    say,
    sign,
)
from tests.support.helm import CHART_DIR, find_manifest, render_chart, rendered_env
from tests.support.pod_security import resource_violations, restricted_violations
from tests.support.slack_fixtures import ACME_TOKEN, BOT_USER_ID, write_export_zip
from tests.support.vllm_fixtures import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TAG = "image-test"
UID = 10001
# What the chart's restricted pods amount to for a container engine.
POD_LIKE = [
    "--read-only",
    "--tmpfs",
    "/tmp:rw,mode=1777",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]
QUICK = ["--epochs", "1", "--batch-size", "8", "--grad-accum", "1", "--max-length", "256"]

pytestmark = pytest.mark.skipif(
    os.environ.get("DOPPEL_IMAGE_TESTS") != "1", reason="image builds are opt-in: DOPPEL_IMAGE_TESTS=1"
)


def _engine_env() -> dict[str, str]:
    conf = os.environ.get("CONTAINERS_CONF", str(REPO_ROOT / "images" / "containers.conf"))
    return {**os.environ, "CONTAINERS_CONF": conf}


def _engine() -> str:
    """The first engine that answers (a docker client without a daemon does not)."""
    for engine in ("podman", "docker"):
        if shutil.which(engine):
            probe = subprocess.run([engine, "info"], capture_output=True, env=_engine_env(), check=False)
            if probe.returncode == 0:
                return engine
    pytest.fail("no container engine answers (podman info, docker info): run `make images` once as root")


class Images:
    def __init__(self, engine: str, names: dict[str, str], figures: dict[str, str], values: Path) -> None:
        self.engine, self.names, self.figures = engine, names, figures
        self.values = values  # the release values build.sh wrote (images by digest)

    def run(
        self, image: str, args: list[str], flags: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """`doppel ARGS` in `image`, as a restricted pod runs it, with extra engine `flags` (-v, -e)."""
        command = [
            self.engine,
            "run",
            "--rm",
            "--network",
            "host",
            *POD_LIKE,
            *flags,
            self.names[image],
            *args,
        ]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=900, env=_engine_env(), check=False
        )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Build the three images once (the engine's layer cache makes a rebuild quick)."""
    engine = _engine()
    env = {
        **_engine_env(),
        "TAG": TAG,
        "VALUES_OUT": str(tmp_path_factory.mktemp("values") / "values.yaml"),
        "TORCH_PIP_ARGS": os.environ.get(
            "DOPPEL_IMAGE_TORCH_PIP_ARGS", "--index-url https://download.pytorch.org/whl/cpu"
        ),
        "BUILD_VOLUMES": os.environ.get("DOPPEL_IMAGE_BUILD_VOLUMES", ""),
        "ENGINE": engine,
    }
    start = time.monotonic()
    build = subprocess.run(
        [str(REPO_ROOT / "images" / "build.sh"), "app", "worker-cpu", "worker"],
        capture_output=True, text=True, timeout=3600, env=env, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    figures = {"total": f"{time.monotonic() - start:.0f} s"}
    figures |= {line.split()[2]: line for line in build.stderr.splitlines() if line.startswith("== built")}
    print("\n".join(figures.values()))
    values = yaml.safe_load(Path(env["VALUES_OUT"]).read_text())["images"]
    names = {key: f"{v['repository']}:{v['tag']}" for key, v in values.items()}
    return Images(engine, names, figures, Path(env["VALUES_OUT"]))


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A directory only the images' user may write: like an NFS export chowned to it (root_squash: nobody
    else can change that)."""
    path = tmp_path / "data"
    path.mkdir()
    os.chown(path, UID, UID)
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_images_are_non_root_and_the_app_image_runs_read_only(images: Images) -> None:
    for name in images.names.values():
        user = subprocess.run(
            [images.engine, "image", "inspect", "--format", "{{.Config.User}}", name],
            capture_output=True, text=True, env=_engine_env(), check=True,
        ).stdout.strip()  # fmt: skip
        assert user == f"{UID}:{UID}", name
    ran = images.run("app", ["--version"])
    assert ran.returncode == 0 and "doppel" in ran.stdout, ran.stderr


def test_the_release_values_name_each_build_by_the_digest_its_archive_keeps(images: Images, tmp_path) -> None:
    """build.sh's values name each local build by digest; the image runs by that reference, an uncompressed
    OCI archive of it (what kind and k3s import) keeps the digest, and the chart renders exactly it."""
    if images.engine == "docker":
        pytest.skip("docker keeps no manifest digest for a local build (PUSH=1 records the registry's)")
    values = yaml.safe_load(images.values.read_text())["images"]
    assert set(values) == {"app", "workerCpu", "worker"}
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"]) for image in values.values()), values
    cpu = values["workerCpu"]
    by_digest = f"{cpu['repository']}@{cpu['digest']}"
    ran = subprocess.run(
        [images.engine, "run", "--rm", *POD_LIKE, by_digest, "--version"],
        capture_output=True, text=True, env=_engine_env(), check=False,
    )  # fmt: skip
    assert ran.returncode == 0 and "doppel" in ran.stdout, ran.stderr
    archive = tmp_path / "worker-cpu.tar"
    subprocess.run(
        [images.engine, "save", "--format", "oci-archive", "--uncompressed", "-o", str(archive),
         images.names["workerCpu"]],
        capture_output=True, env=_engine_env(), check=True,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert [m["digest"] for m in index["manifests"]] == [cpu["digest"]]
    manifests = render_chart([images.values])
    (container,) = find_manifest(manifests, "Deployment", "operator")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == f"{values['app']['repository']}@{values['app']['digest']}"
    env = rendered_env(manifests, "operator")
    assert env["DOPPEL_WORKER_IMAGE"] == f"{values['worker']['repository']}@{values['worker']['digest']}"
    assert by_digest in json.dumps(env)  # the scrape and cleanup Jobs' image


async def test_the_bot_in_its_image_answers_a_signed_event(images: Images, bot_kube, slack_emulator) -> None:
    kube = kube_for(bot_kube[1])
    await kube.create_doppel(NAMESPACE, doppel_body("alice", "U01ALICE", phase="Registering"))
    port = free_port()
    env = {
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_BOT_TOKEN": ACME_TOKEN,
        "SLACK_API_URL": slack_emulator.base_url,
        "DOPPEL_BOT_NAMESPACE": BOT_NAMESPACE,
        "DOPPEL_TEAM_NAMESPACES": f"{TEAM_ID}={NAMESPACE}",
    }
    name = f"doppel-bot-{port}"
    flags = [flag for key, value in env.items() for flag in ("-e", f"{key}={value}")]
    command = [images.engine, "run", "-d", "--name", name, "--network", "host", *POD_LIKE, *flags,
               images.names["app"], "bot", "--port", str(port), "--kube-server", bot_kube[1]]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=_engine_env())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, _logs(images, name)
                await asyncio.sleep(0.5)
            ts = say(slack_emulator, "U02BOB", f"<@{BOT_USER_ID}> ping")
            body = httpx.Request(
                "POST", "/", json=mention_payload("ping", ts, event_id="EvImg")
            ).content.decode()
            response = await client.post(
                "/slack/events", content=body, headers={"Content-Type": "application/json", **sign(body)}
            )
            assert response.status_code == 200
            unsigned = await client.post(
                "/slack/events", content=body, headers={"Content-Type": "application/json"}
            )
            assert unsigned.status_code == 401
            for _ in range(200):
                if slack_emulator.posted(CHANNEL):
                    break
                await asyncio.sleep(0.05)
            assert "still training (Registering)" in slack_emulator.posted(CHANNEL)[0]["text"], _logs(
                images, name
            )
    finally:
        logs = _logs(images, name)
        subprocess.run([images.engine, "rm", "-f", name], capture_output=True, env=_engine_env(), check=False)
    assert ACME_TOKEN not in logs and "Traceback" not in logs


def _logs(images: Images, name: str) -> str:
    """The container's output and state (an empty log says little on its own)."""
    state = subprocess.run(
        [images.engine, "ps", "-a", "--filter", f"name={name}", "--format", "{{.Status}}"],
        capture_output=True, text=True, env=_engine_env(), check=False,
    ).stdout  # fmt: skip
    out = subprocess.run(
        [images.engine, "logs", name], capture_output=True, text=True, env=_engine_env(), check=False
    )
    return f"{name}: {state.strip()}\n{out.stdout}{out.stderr}"


async def test_the_operator_in_its_image_starts_with_the_chart_environment(images: Images, kube) -> None:
    cpu_image = {"repository": "localhost/doppel-dev/doppel-worker-cpu", "tag": TAG}
    manifests = render_chart(set_values={"images": {"workerCpu": cpu_image}})
    env = rendered_env(manifests, "operator")
    health = free_port()
    env |= {
        "DOPPEL_NAMESPACES": "team",  # the emulator's namespace (the chart: the release's, by fieldRef)
        "DOPPEL_API_SERVER": kube.cluster.url,
        "DOPPEL_PEER_ID": "operator-0",
        "DOPPEL_METRICS_PORT": "0",
        "DOPPEL_LIVENESS": f"http://127.0.0.1:{health}/healthz",
    }
    name = f"doppel-operator-{health}"
    flags = [flag for key, value in env.items() for flag in ("-e", f"{key}={value}")]
    command = [images.engine, "run", "-d", "--name", name, "--network", "host", *POD_LIKE, *flags,
               images.names["app"], "operator"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=_engine_env())
    try:
        # The chart's peering object, in the emulator's namespace (the operator waits for it otherwise).
        (peering,) = [m for m in manifests if m["kind"] == "KopfPeering"]
        await kube.kubectl.create(
            {**peering, "metadata": {"name": env["DOPPEL_PEERING"], "namespace": "team"}}
        )
        await kube.kubectl.secret("slack-bot-token", {"token": ACME_TOKEN})
        example = yaml.safe_load((CHART_DIR / "examples" / "doppeluser.yaml").read_text())
        example["metadata"]["namespace"] = "team"
        await kube.kubectl.create(example)
        deadline = time.monotonic() + 120
        while not (
            jobs := [j for j in await kube.kubectl.list("Job") if "-scrape-" in j["metadata"]["name"]]
        ):
            assert time.monotonic() < deadline, _logs(images, name)
            await asyncio.sleep(0.5)
        pod = jobs[0]["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [] and resource_violations(pod) == []
        assert pod["containers"][0]["image"] == f"localhost/doppel-dev/doppel-worker-cpu:{TAG}"
        # The chart's 3600 s is given once the operator has recorded the Job's outcome, never before.
        ended = any(
            c.get("type") in ("Complete", "Failed") for c in jobs[0].get("status", {}).get("conditions") or []
        )
        assert jobs[0]["spec"].get("ttlSecondsAfterFinished") in ((None, 3600) if ended else (None,))
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"http://127.0.0.1:{health}/healthz")).status_code == 200
    finally:
        logs = _logs(images, name)
        subprocess.run([images.engine, "rm", "-f", name], capture_output=True, env=_engine_env(), check=False)
    assert "Traceback" not in logs, logs[-3000:]


def test_the_cpu_worker_scrapes_onto_a_volume_only_its_user_may_write(
    images: Images, volume: Path, slack_emulator
) -> None:
    ran = images.run(
        "workerCpu",
        ["scrape", "--user", "alice", "--out", "/data/team/alice/g1", "--rate-scale", "1000",
         "--slack-api-url", slack_emulator.base_url],
        ("-v", f"{volume}:/data", "-e", f"SLACK_BOT_TOKEN={ACME_TOKEN}",
         "-e", "DOPPEL_RESULT_FILE=/data/result.json"),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert json.loads((volume / "result.json").read_text())["samples"] == 8
    samples = volume / "team" / "alice" / "g1" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 8 and samples.stat().st_uid == UID


def test_the_train_worker_trains_on_cpu_onto_the_volume(images: Images, volume: Path, style_samples) -> None:
    shutil.copy(style_samples.samples, volume / "samples.jsonl")
    os.chown(volume / "samples.jsonl", UID, UID)
    start = time.monotonic()
    made = images.run("worker", ["make-tiny-model", "/data/model"], ("-v", f"{volume}:/data"))
    assert made.returncode == 0, made.stderr[-2000:]
    trained = images.run(
        "worker",
        ["train", "--data", "/data/samples.jsonl", "--base-model", "/data/model", "--base-model-name",
         "doppel-tiny", "--out", "/data/adapters/v1", "--rank", "4", "--alpha", "8", *QUICK],
        # HOME as the operator's Job pods set it (their root filesystem is read-only too).
        ("-v", f"{volume}:/data", "-e", "DOPPEL_RESULT_FILE=/data/result.json", "-e", "HOME=/tmp"),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    print(f"tiny model made and trained in the worker image in {time.monotonic() - start:.0f} s")
    adapter = volume / "adapters" / "v1"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert (adapter / "adapter_model.safetensors").stat().st_uid == UID
    assert json.loads((volume / "result.json").read_text())["ok"] is True


def test_a_volume_its_user_may_not_write_is_reported_as_storage(
    images: Images, tmp_path: Path, slack_workspace
) -> None:
    """An NFS export left owned by root (root_squash: the pod cannot chown it): the Job says so, with the
    path and its user, as kind "storage" (the operator's StorageWritable=False)."""
    volume = tmp_path / "root-owned"
    volume.mkdir(mode=0o755)
    results = tmp_path / "results"
    results.mkdir()
    os.chown(results, UID, UID)
    write_export_zip(slack_workspace, volume / "export.zip")
    ran = images.run(
        "workerCpu",
        ["scrape", "--export", "/data/export.zip", "--user", "alice", "--out", "/data/team/alice/g1"],
        ("-v", f"{volume}:/data", "-v", f"{results}:/results", "-e", "DOPPEL_RESULT_FILE=/results/r.json"),
    )
    assert ran.returncode == 1, ran.stderr
    summary = json.loads((results / "r.json").read_text())
    assert summary["kind"] == "storage" and summary["reason"].startswith(
        "cannot write /data/team: permission"
    )
    assert f"as uid {UID} gid {UID}" in summary["reason"] and "Traceback" not in ran.stderr
