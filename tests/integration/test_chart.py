"""The Helm chart, checked with the real helm binary and the Kubernetes schemas.

helm lints and renders charts/doppel exactly as `helm install` would; every rendered object is validated
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields refused), the CRD against
the CustomResourceDefinition schema, and the example DoppelUser against the CRD's own schema.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml
from tests.support.helm import (
    CHART_DIR,
    NAMESPACE,
    REPO_ROOT,
    REQUIRED_TEST_VALUES,
    HelmError,
    find_manifest,
    find_manifests,
    helm,
    parse_manifests,
    render_chart,
    rendered_env,
    template_chart,
    tool,
)
from tests.support.vllm_fixtures import vllm_python

from doppel import api
from doppel.bot.config import DEFAULT_SCOPES, BotConfig
from doppel.bot.intake import EVENTS_PATH
from doppel.bot.oauth import INSTALL_PATH, REDIRECT_PATH
from doppel.cli import main
from doppel.crd import crd_manifest

SCALED_VALUES = CHART_DIR / "examples" / "values-scaled.yaml"
EXAMPLE_DOPPELUSER = CHART_DIR / "examples" / "doppeluser.yaml"
# The chart's minimum (Chart.yaml kubeVersion) and the newest version kubectl from `make tools` speaks.
KUBE_VERSIONS = ("1.33.0", "1.35.0")
# Custom resources the chart renders besides the CRDs (kopf's peering, Prometheus Operator objects).
CUSTOM_GROUPS = {"kopf.dev", "monitoring.coreos.com"}
# The scaled-out example is for several workspaces through OAuth, so it gets OAuth credentials.
OAUTH_VALUES = {"slack": {"botToken": "", "clientId": "123.456", "clientSecret": "oauth-secret"}}


@pytest.fixture(scope="module")
def default_manifests() -> list[dict[str, Any]]:
    return render_chart()


@pytest.fixture(scope="module")
def scaled_manifests() -> list[dict[str, Any]]:
    return render_chart([SCALED_VALUES], OAUTH_VALUES)


def container(deployment: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env_of(deployment: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment, name).get("env", [])}


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO_ROOT / "crds" / "doppelusers.yaml").read_text(encoding="utf-8"))
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate_against_crd(obj: Mapping[str, Any]) -> None:
    # A CRD schema is OpenAPI v3.0: draft-4 semantics (boolean exclusiveMinimum); x-kubernetes-* ignored.
    jsonschema.Draft4Validator(crd_schema()).validate(obj)


def test_helm_lint_passes_strict_with_default_and_scaled_values(tmp_path: Path) -> None:
    team = {"workspaces": ["T0123ABCD"]}
    slack = tmp_path / "slack.yaml"
    slack.write_text(yaml.safe_dump({"slack": {"signingSecret": "s", "botToken": "xoxb-1"}, **team}))
    oauth = tmp_path / "oauth.yaml"
    oauth.write_text(yaml.safe_dump({"slack": {"signingSecret": "s", **OAUTH_VALUES["slack"]}, **team}))
    out = helm("lint", "--strict", str(CHART_DIR), "-f", str(slack))
    assert "0 chart(s) failed" in out
    out = helm("lint", "--strict", str(CHART_DIR), "-f", str(SCALED_VALUES), "-f", str(oauth))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("which", ["default", "scaled"])
def test_every_rendered_manifest_is_valid_kubernetes(which: str, request: pytest.FixtureRequest) -> None:
    manifests = request.getfixturevalue(f"{which}_manifests")
    kinds = {m["kind"] for m in manifests}
    assert {"CustomResourceDefinition", "Deployment", "Service", "NetworkPolicy", "Role"} <= kinds
    for manifest in manifests:
        if manifest["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue  # no Kubernetes schema: test_chart_monitoring.py validates them
        for version in KUBE_VERSIONS:
            # The CRD too: it is checked as a CustomResourceDefinition (apiextensions.k8s.io/v1).
            kubernetes_validate.validate(manifest, version, strict=True)


def test_a_key_given_twice_is_caught() -> None:
    """What the chart once did with labels: the API server's strict decoding refuses it, and so do we."""
    with pytest.raises(yaml.YAMLError, match="duplicate keys"):
        parse_manifests("metadata:\n  labels:\n    app: a\n    app: a\n")


def test_a_wrong_manifest_is_caught_by_the_validator(default_manifests: list[dict[str, Any]]) -> None:
    """The validation above is not vacuous: a string replica count or an unknown field is refused."""
    deployment = copy.deepcopy(find_manifest(default_manifests, "Deployment", "vllm"))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(find_manifest(default_manifests, "Deployment", "vllm"))
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_chart_crd_is_the_generated_crd(default_manifests: list[dict[str, Any]]) -> None:
    chart_crd = CHART_DIR / "crds" / "doppelusers.yaml"
    assert chart_crd.read_text(encoding="utf-8") == (REPO_ROOT / "crds" / "doppelusers.yaml").read_text(
        encoding="utf-8"
    ), "charts/doppel/crds/doppelusers.yaml drifted: cp crds/doppelusers.yaml charts/doppel/crds/"
    (rendered,) = [
        crd
        for crd in find_manifests(default_manifests, "CustomResourceDefinition")
        if crd["spec"]["group"] == api.GROUP
    ]
    assert rendered == crd_manifest()


def test_example_doppeluser_fits_the_crd_and_the_default_install() -> None:
    example = yaml.safe_load(EXAMPLE_DOPPELUSER.read_text(encoding="utf-8"))
    assert (example["apiVersion"], example["kind"]) == (f"{api.GROUP}/{api.VERSION}", api.KIND)
    validate_against_crd(example)
    spec = api.DoppelUserSpec.model_validate(example["spec"])  # the operator parses it the same way
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    served = values["model"]["servedName"] or values["model"]["name"]
    assert spec.base_model.served_name == served, "the example must name the model vLLM serves by default"
    assert spec.training.rank <= values["vllm"]["maxLoraRank"], "vLLM would refuse the adapter"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "slack", "teamId"), "acme"),
        (("spec", "training", "rank"), 0),
        (("spec", "data", "maxSamples"), "many"),
        (("spec", "retention", "afterTraining"), "Archive"),
    ],
)
def test_wrong_doppeluser_is_refused_by_the_crd_schema(path: tuple[str, ...], value: Any) -> None:
    example = yaml.safe_load(EXAMPLE_DOPPELUSER.read_text(encoding="utf-8"))
    node = example
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_against_crd(example)


def test_vllm_serves_loras_from_the_volume_the_operator_writes_to(
    default_manifests: list[dict[str, Any]],
) -> None:
    vllm = find_manifest(default_manifests, "Deployment", "vllm")
    operator = find_manifest(default_manifests, "Deployment", "operator")
    server = container(vllm, "vllm")
    args = server["args"]
    assert args[0] == "Qwen/Qwen2.5-1.5B-Instruct"
    for flag in ("--enable-lora", "--max-loras=4", "--max-cpu-loras=32", "--max-lora-rank=32"):
        assert flag in args
    assert env_of(vllm, "vllm")["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    # One replica: the old pod serves until its replacement is ready (no outage on every upgrade).
    assert vllm["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # The train Job writes adapters under DOPPEL_DATA_ROOT on the shared claim: vLLM reads the same path.
    operator_env = env_of(operator, "operator")
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "data"]
    assert mount["mountPath"] == operator_env["DOPPEL_DATA_ROOT"] == "/data"
    (volume,) = [v for v in vllm["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert volume["persistentVolumeClaim"]["claimName"] == operator_env["DOPPEL_DATA_CLAIM"]
    pvc = find_manifest(default_manifests, "PersistentVolumeClaim", "data")
    assert pvc["metadata"]["name"] == operator_env["DOPPEL_DATA_CLAIM"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # The operator registers adapters on the pod port named "http": vLLM's own API port.
    (http,) = [
        p for c in vllm["spec"]["template"]["spec"]["containers"] for p in c["ports"] if p["name"] == "http"
    ]
    assert http["containerPort"] == 8000 and http in server["ports"]


def test_the_bot_reads_memory_and_keeps_feedback_where_the_jobs_write(
    default_manifests: list[dict[str, Any]],
) -> None:
    """Memory indexes sit beside the adapters (status.adapter.path, as the vLLM pods see it) and feedback in
    each doppel's directory: the bot mounts the same claim at the same path, writable by the Jobs' group."""
    bot = find_manifest(default_manifests, "Deployment", "bot")
    vllm = find_manifest(default_manifests, "Deployment", "vllm")
    (mount,) = [m for m in container(bot, "bot")["volumeMounts"] if m["name"] == "data"]
    (vllm_mount,) = [m for m in container(vllm, "vllm")["volumeMounts"] if m["name"] == "data"]
    assert mount["mountPath"] == vllm_mount["mountPath"] == env_of(bot, "bot")["DOPPEL_DATA_ROOT"]
    assert not mount.get("readOnly")
    claims = [
        {v["name"]: v.get("persistentVolumeClaim") for v in d["spec"]["template"]["spec"]["volumes"]}["data"]
        for d in (bot, vllm)
    ]
    assert claims[0] == claims[1]
    assert bot["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001


def test_default_doppeluser_selector_finds_the_vllm_pods(default_manifests: list[dict[str, Any]]) -> None:
    pod_labels = find_manifest(default_manifests, "Deployment", "vllm")["spec"]["template"]["metadata"][
        "labels"
    ]
    selector = api.Vllm().selector
    assert selector.items() <= pod_labels.items()
    # ...and only them: no other pod of the release carries those labels.
    for deployment in find_manifests(default_manifests, "Deployment"):
        if not deployment["metadata"]["name"].endswith("-vllm"):
            assert not selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_only_the_operator_reaches_adapter_loading(default_manifests: list[dict[str, Any]]) -> None:
    """NetworkPolicy: the operator on vLLM's API port; the bot on the chat proxy's port, which forwards
    inference paths only. The bot's VLLM_URL goes through the Service to that chat port."""
    policy = find_manifest(default_manifests, "NetworkPolicy", "vllm")
    vllm = find_manifest(default_manifests, "Deployment", "vllm")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= vllm["spec"]["template"]["metadata"]["labels"].items()
    )
    labels = {
        component: find_manifest(default_manifests, "Deployment", component)["spec"]["template"]["metadata"][
            "labels"
        ]
        for component in ("operator", "bot")
    }
    allowed: dict[int, list[str]] = {}
    for rule in policy["spec"]["ingress"]:
        for peer in rule.get("from", [{"podSelector": {"matchLabels": {"anyone": "at-all"}}}]):
            who = [
                c for c, pod in labels.items() if peer["podSelector"]["matchLabels"].items() <= pod.items()
            ] or ["anyone"]
            for port in rule["ports"]:
                allowed.setdefault(port["port"], []).extend(who)
    # Prometheus (anyone, by default) reaches the proxy's metrics port only.
    assert allowed == {8000: ["operator"], 8080: ["bot"], 9091: ["anyone"]}

    service = find_manifest(default_manifests, "Service", "vllm")
    assert service["spec"]["ports"][0]["targetPort"] == "chat"
    proxy = container(vllm, "chat-proxy")
    assert proxy["ports"][0] == {"name": "chat", "containerPort": 8080, "protocol": "TCP"}
    bot_env = env_of(find_manifest(default_manifests, "Deployment", "bot"), "bot")
    assert (
        bot_env["VLLM_URL"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )

    conf = find_manifest(default_manifests, "ConfigMap", "chat-proxy")["data"]["default.conf"]
    assert "location = /v1/chat/completions" in conf
    assert "lora" not in conf, "the chat port must not forward adapter loading"
    assert "location / { return 403; }" in conf


def test_without_the_proxy_the_bot_gets_vllm_port_and_nobody_else() -> None:
    manifests = render_chart(set_values={"vllm": {"chatProxy": {"enabled": False, "port": 8080}}})
    policy = find_manifest(manifests, "NetworkPolicy", "vllm")
    assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [
        [{"port": 8000, "protocol": "TCP"}],
        [{"port": 8000, "protocol": "TCP"}],
    ]
    vllm = find_manifest(manifests, "Deployment", "vllm")
    assert [c["name"] for c in vllm["spec"]["template"]["spec"]["containers"]] == ["vllm"]
    assert find_manifest(manifests, "Service", "vllm")["spec"]["ports"][0]["targetPort"] == "http"
    assert not find_manifests(manifests, "ConfigMap")


def test_scaled_values_scale_out(scaled_manifests: list[dict[str, Any]]) -> None:
    vllm = find_manifest(scaled_manifests, "Deployment", "vllm")
    assert vllm["spec"]["replicas"] == 4
    assert "--max-loras=16" in container(vllm, "vllm")["args"]
    assert "--enable-prefix-caching" in container(vllm, "vllm")["args"]
    assert "--served-model-name=qwen2.5-7b-instruct" in container(vllm, "vllm")["args"]
    bot = find_manifest(scaled_manifests, "Deployment", "bot")
    assert bot["spec"]["replicas"] == 3
    bot_env = env_of(bot, "bot")
    assert bot_env["DOPPEL_TEAM_NAMESPACES"] == "T0123ABCD=doppel,T0456EFGH=doppel,T0789IJKL=doppel"
    assert bot_env["SLACK_REDIRECT_URI"] == "https://doppel.example.com/slack/oauth_redirect"
    assert (
        env_of(find_manifest(scaled_manifests, "Deployment", "operator"), "operator")["DOPPEL_MAX_TRAININGS"]
        == "4"
    )
    ingress = find_manifest(scaled_manifests, "Ingress", "bot")
    assert ingress["spec"]["rules"][0]["host"] == "doppel.example.com"
    assert ingress["spec"]["tls"][0]["secretName"] == "doppel-example-com-tls"
    secret = find_manifest(scaled_manifests, "Secret", "slack")
    assert set(secret["stringData"]) == {"SLACK_SIGNING_SECRET", "SLACK_CLIENT_ID", "SLACK_CLIENT_SECRET"}


def test_existing_secret_and_claim_are_used_instead_of_created() -> None:
    manifests = render_chart(
        set_values={
            "slack": {"existingSecret": "my-slack"},
            "storage": {"existingClaim": "shared-nfs"},
            "workspaces": ["T0123ABCD"],
        },
        required_values=False,
    )
    assert not find_manifests(manifests, "Secret")
    assert not find_manifests(manifests, "PersistentVolumeClaim")
    bot = find_manifest(manifests, "Deployment", "bot")
    assert container(bot, "bot")["envFrom"] == [{"secretRef": {"name": "my-slack"}}]
    vllm = find_manifest(manifests, "Deployment", "vllm")
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in vllm["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["shared-nfs"]
    assert env_of(find_manifest(manifests, "Deployment", "operator"), "operator")["DOPPEL_DATA_CLAIM"] == (
        "shared-nfs"
    )


def test_missing_signing_secret_or_workspaces_is_a_clear_error() -> None:
    with pytest.raises(HelmError, match=r"/slack/signingSecret': minLength"):
        template_chart(set_values={"workspaces": ["T0123ABCD"]}, required_values=False)
    with pytest.raises(HelmError, match=r"/workspaces': minItems"):
        template_chart(
            set_values={"slack": {"signingSecret": "s", "botToken": "xoxb-1"}}, required_values=False
        )
    # An existing Secret holds the signing secret instead.
    template_chart(
        set_values={"workspaces": ["T0123ABCD"], "slack": {"existingSecret": "slack"}}, required_values=False
    )


def test_helm_lint_fails_without_the_required_values() -> None:
    with pytest.raises(HelmError) as caught:
        helm("lint", "--strict", str(CHART_DIR))
    assert "/workspaces" in str(caught.value) and "/slack/signingSecret" in str(caught.value)


def test_values_schema_is_a_valid_schema_that_the_shipped_values_meet() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    # The defaults lack exactly the values a user must give (so `helm lint` fails until they are there).
    missing = sorted("/".join(map(str, e.absolute_path)) for e in validator.iter_errors(defaults))
    assert missing == ["slack/signingSecret", "workspaces"]
    for path in (CHART_DIR / "values.yaml", SCALED_VALUES):
        values = _merged(defaults, REQUIRED_TEST_VALUES)
        # The scaled example is an overlay: check it merged onto the defaults, as helm does.
        if path == SCALED_VALUES:
            values = _merged(values, yaml.safe_load(path.read_text(encoding="utf-8")))
        assert not list(validator.iter_errors(values)), path.name


def _merged(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merged(out[key], value) if isinstance(value, Mapping) and key in out else value
    return out


def test_fewer_cpu_than_gpu_adapters_is_a_clear_error() -> None:
    with pytest.raises(HelmError, match=r"vllm\.maxCpuLoras must be at least vllm\.maxLoras"):
        template_chart(set_values={"vllm": {"maxLoras": 8, "maxCpuLoras": 4}})


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"vllm": {"maxLoraRank": 24}}, "/vllm/maxLoraRank"),
        ({"vllm": {"replicas": "two"}}, "/vllm/replicas"),
        ({"vllm": {"gpuMemoryUtilization": 1.5}}, "/vllm/gpuMemoryUtilization"),
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"bot": {"mode": "rtm"}}, "/bot/mode"),
        ({"workspaces": ["acme"]}, "/workspaces/0"),
        ({"storage": {"accessModes": ["ReadWriteSometimes"]}}, "/storage/accessModes/0"),
        ({"slack": {"botToken": "xoxp-user-token"}}, "/slack/botToken"),
        ({"vllm": {"maxLora": 4}}, "maxLora"),
        ({"images": {"vllm": {"tag": ""}}}, "/images/vllm/tag"),
    ],
)
def test_wrong_values_are_rejected_by_the_schema(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError) as caught:
        template_chart(set_values=values)
    message = str(caught.value)
    assert "schema" in message
    assert complaint in message


def test_notes_tell_how_to_connect_slack_and_create_a_doppel() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        values = Path(tmp) / "values.yaml"
        values.write_text(
            yaml.safe_dump(
                {
                    "slack": {"signingSecret": "s", "botToken": "xoxb-1"},
                    "workspaces": ["T0123ABCD"],
                    "bot": {"ingress": {"enabled": True}},
                }
            )
        )
        out = helm(
            "install",
            "doppel",
            str(CHART_DIR),
            "--dry-run=client",
            "--namespace",
            "team-a",
            "-f",
            str(values),
        )
    notes = out[out.index("NOTES:") :]
    assert "https://doppel.example.com/slack/events" in notes
    assert "servedName: Qwen/Qwen2.5-1.5B-Instruct" in notes
    assert "kubectl -n team-a apply -f doppeluser.yaml" in notes
    assert "kubectl -n team-a get doppel -w" in notes


def install_guide_commands() -> list[list[str]]:
    """The shell commands of the install guide and of the upgrade section, continuation lines joined."""
    install = (REPO_ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    operating = (REPO_ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    upgrades = operating.split("\n## Upgrades\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```sh\n(.*?)```", install + upgrades, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def test_every_command_of_the_install_guide_works_offline() -> None:
    """Each command runs the way the guide writes it, as far as a machine without a cluster can go:
    kubectl creates and helm installs in client-side dry-run mode, files named exist and are valid."""
    commands = install_guide_commands()
    assert {tuple(c[:2]) for c in commands} >= {("docker", "build"), ("helm", "install"), ("kubectl", "-n")}
    kubectl = str(tool("kubectl"))
    ran = 0
    for command in commands:
        program, args = command[0], command[1:]
        if program == "docker":
            if args[0] == "build":
                assert (REPO_ROOT / args[args.index("-f") + 1]).is_file()
            continue
        assert program in {"helm", "kubectl"}, command
        if program == "helm" and args[0] in ("get", "upgrade"):
            # Upgrades need a cluster; at least they keep the user's values in a file, not --reuse-values
            # (which drops new chart defaults).
            assert "--reuse-values" not in args and ("-f" in args or args[0] == "get"), command
            continue
        if program == "helm":
            assert args[0] == "install"
            helm(*args, "--dry-run=client", cwd=REPO_ROOT)
        elif "create" in args:
            proc = subprocess.run(
                [kubectl, *args, "--dry-run=client", "-o", "yaml"],
                capture_output=True, text=True, check=False, env={"KUBECONFIG": "/nonexistent"},
            )  # fmt: skip
            assert proc.returncode == 0, f"{command}: {proc.stderr}"
        elif "apply" in args:
            manifest = yaml.safe_load((REPO_ROOT / args[args.index("-f") + 1]).read_text(encoding="utf-8"))
            if manifest["kind"] == "CustomResourceDefinition":
                # Helm's field manager owns the CRD: a server-side apply must force the conflicts.
                assert {"--server-side", "--force-conflicts"} <= set(args), command
                continue
            validate_against_crd(manifest)
        else:
            # get/describe need a cluster: check at least that they name the CRD's short name.
            assert args[2] in {"get", "describe"} and args[3] in {"pods", api.SHORT_NAME}, command
            continue
        ran += 1
    assert ran >= 6


def test_missing_helm_skips_or_fails_when_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without `make tools`, chart tests skip; under `make test` (DOPPEL_REQUIRE_TOOLS=1) they fail."""
    monkeypatch.setenv("DOPPEL_TOOLS_DIR", str(tmp_path))
    monkeypatch.delenv("DOPPEL_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make tools"):
        tool("helm")
    monkeypatch.setenv("DOPPEL_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="helm is required"):
        tool("helm")


@pytest.mark.parametrize(
    ("which", "worker_image", "max_trainings"),
    [
        ("default", "ghcr.io/doppel-dev/doppel-worker:0.1.0", 1),
        ("scaled", "registry.example.com/doppel/doppel-worker:0.1.0", 4),
    ],
)
def test_operator_reads_the_chart_environment(
    which: str,
    worker_image: str,
    max_trainings: int,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`doppel operator` parses the environment the chart gives it into the intended settings."""
    manifests = request.getfixturevalue(f"{which}_manifests")
    env = rendered_env(manifests, "operator")
    command = main.commands["operator"]
    known = {opt.envvar for opt in command.params if isinstance(opt, click.Option)}
    assert set(env) <= known, f"the operator reads no {set(env) - known}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    params = command.make_context("operator", []).params
    claim = find_manifest(manifests, "PersistentVolumeClaim", "data")["metadata"]["name"]
    assert (params["namespaces"], params["data_root"], params["data_claim"]) == ((NAMESPACE,), "/data", claim)
    assert (params["worker_image"], params["max_trainings"]) == (worker_image, max_trainings)
    vllm_args = container(find_manifest(manifests, "Deployment", "vllm"), "vllm")["args"]
    assert f"--max-lora-rank={params['max_lora_rank']}" in vllm_args  # a rank vLLM refuses is refused early
    assert (params["keep_adapters"], params["fs_group"]) == (1, 10001)
    assert params["hf_home"] == "/data/huggingface" and params["pending_timeout"] == 600
    job_account = find_manifest(manifests, "ServiceAccount", "worker")
    assert params["service_account"] == job_account["metadata"]["name"]
    assert job_account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("which", ["default", "scaled"])
def test_bot_reads_the_chart_environment(which: str, request: pytest.FixtureRequest) -> None:
    """The bot's configuration, read from the chart's environment, reaches vLLM through the chat Service
    and keeps listed workspaces' doppels in the release namespace (next to the shared volume)."""
    manifests = request.getfixturevalue(f"{which}_manifests")
    config = BotConfig.from_env(rendered_env(manifests, "bot"))
    args = container(find_manifest(manifests, "Deployment", "bot"), "bot")["args"]
    assert args[0] == "bot"
    params = main.commands["bot"].make_context("bot", args[1:]).params
    assert (params["host"], params["port"], params["socket_mode"]) == ("0.0.0.0", 3000, False)
    service = find_manifest(manifests, "Service", "vllm")
    assert config.vllm_url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert config.bot_namespace == NAMESPACE
    assert config.oauth is (which == "scaled")
    if which == "scaled":
        assert config.namespace_for("T0456EFGH") == NAMESPACE
        assert config.oauth_redirect_uri == "https://doppel.example.com/slack/oauth_redirect"
        assert config.max_doppels_per_workspace == 50


def test_every_value_is_documented() -> None:
    """values.yaml explains each key: a comment on its line or on the line above."""
    lines = (CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines()
    key = re.compile(r"^\s*[A-Za-z][\w./-]*:")
    undocumented = [
        line.strip()
        for previous, line in zip(["#", *lines], lines, strict=False)
        if key.match(line) and "#" not in line and not previous.strip().startswith("#")
    ]
    assert not undocumented


def test_slack_app_manifest_matches_the_bot() -> None:
    """The example Slack app asks for every scope the bot requests and points Slack at the bot's routes,
    which the chart's Ingress exposes."""
    app = yaml.safe_load((CHART_DIR / "examples" / "slack-app-manifest.yaml").read_text(encoding="utf-8"))
    scopes = set(app["oauth_config"]["scopes"]["bot"])
    assert set(DEFAULT_SCOPES) <= scopes
    assert {
        "chat:write",
        "chat:write.customize",
        "app_mentions:read",
        "channels:history",
        "commands",
    } <= scopes
    assert app["settings"]["event_subscriptions"]["bot_events"] == ["app_mention"]
    urls = [
        app["settings"]["event_subscriptions"]["request_url"],
        app["settings"]["interactivity"]["request_url"],
        app["features"]["slash_commands"][0]["url"],
    ]
    assert {url.removeprefix("https://doppel.example.com") for url in urls} == {EVENTS_PATH}
    assert app["features"]["slash_commands"][0]["command"] == "/doppel"
    (redirect,) = app["oauth_config"]["redirect_urls"]
    assert redirect == f"https://doppel.example.com{REDIRECT_PATH}"
    ingress = find_manifest(
        render_chart(set_values={"bot": {"ingress": {"enabled": True}}}), "Ingress", "bot"
    )
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert all(route.startswith(path["path"] + "/") for route in (EVENTS_PATH, REDIRECT_PATH, INSTALL_PATH))


# Runs in vLLM's own virtualenv: parse each argument list exactly as `vllm serve` does, then build the
# LoRA config from it (which checks the rank and the CPU/GPU adapter counts).
VLLM_PARSE = """
import json, sys
from vllm.config.lora import LoRAConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

root = FlexibleArgumentParser()
ServeSubcommand().subparser_init(root.add_subparsers(dest="subcommand"))
out = []
for argv in json.load(sys.stdin):
    args = root.parse_args(argv)
    engine = AsyncEngineArgs.from_cli_args(args)
    LoRAConfig(
        max_lora_rank=engine.max_lora_rank, max_loras=engine.max_loras, max_cpu_loras=engine.max_cpu_loras
    )
    out.append({"model": args.model_tag, "served": engine.served_model_name, "lora": engine.enable_lora,
                "rank": engine.max_lora_rank, "port": args.port})
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_vllm_accepts_the_rendered_arguments(
    default_manifests: list[dict[str, Any]], scaled_manifests: list[dict[str, Any]]
) -> None:
    """The real vLLM (the version the chart's image pins) parses the chart's `vllm serve` command line."""
    argvs = []
    for manifests in (default_manifests, scaled_manifests):
        server = container(find_manifest(manifests, "Deployment", "vllm"), "vllm")
        assert server["command"] == ["vllm", "serve"]
        argvs.append(["serve", *server["args"]])
    proc = subprocess.run(
        [vllm_python(), "-c", VLLM_PARSE],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, scaled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert default == {
        "model": "Qwen/Qwen2.5-1.5B-Instruct",
        "served": ["Qwen/Qwen2.5-1.5B-Instruct"],
        "lora": True,
        "rank": 32,
        "port": 8000,
    }
    assert (scaled["served"], scaled["rank"]) == (["qwen2.5-7b-instruct"], 64)


def test_socket_mode_bot_needs_an_app_token_and_no_service() -> None:
    with pytest.raises(HelmError, match=r"bot\.mode=socket needs slack\.appToken"):
        template_chart(set_values={"bot": {"mode": "socket"}})
    manifests = render_chart(
        set_values={"bot": {"mode": "socket", "ingress": {"enabled": True}}, "slack": {"appToken": "xapp-1"}}
    )
    bot = container(find_manifest(manifests, "Deployment", "bot"), "bot")
    params = main.commands["bot"].make_context("bot", bot["args"][1:]).params
    assert params["socket_mode"] is True
    assert BotConfig.from_env(rendered_env(manifests, "bot")).app_token == "xapp-1"
    # It connects out: no HTTP port or probes that would fail, nothing for Slack to reach (only metrics).
    assert [p["name"] for p in bot["ports"]] == ["metrics"] and "readinessProbe" not in bot
    bot_service = find_manifest(manifests, "Service", "bot")
    assert [p["name"] for p in bot_service["spec"]["ports"]] == ["metrics"]
    assert bot_service["spec"]["type"] == "ClusterIP"
    assert not find_manifests(manifests, "Ingress")
