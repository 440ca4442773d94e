"""`doppel chat` driven as a person would: a subprocess with arguments and standard input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from click.testing import CliRunner
from tests.support.model_fixtures import STYLE_MARKER, STYLE_PERSON
from tests.support.vllm_fixtures import free_port

from doppel.cli import main

QUESTION = "Bob: any news on the newsletter?"


def doppel(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "doppel.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _greedy(adapter, person: str, *backend: str) -> list[str]:
    sampling = ["--temperature", "0", "--max-tokens", "40"]
    return ["--adapter", str(adapter), *backend, "--person", person, *sampling]


@pytest.mark.vllm
@pytest.mark.parametrize("api", ["", "/v1/"], ids=["server", "openai-base-url"])
def test_once_through_vllm_replies_in_style_and_leaves_the_server_as_found(vllm_server, trained_adapter, api):
    # The server's address, or the OpenAI API base that OpenAI clients are given (`.../v1`): the same server.
    result = doppel(
        "chat",
        *_greedy(trained_adapter, STYLE_PERSON, "--vllm-url", vllm_server.base_url + api),
        "--once",
        QUESTION,
    )
    assert result.returncode == 0, result.stderr
    assert STYLE_MARKER in result.stdout
    served = httpx.get(f"{vllm_server.base_url}/v1/models").json()["data"]
    assert [m["id"] for m in served if m["parent"]] == []


@pytest.mark.vllm
def test_rank_too_large_through_the_cli_is_a_one_line_bad_input(vllm_server, rank64_adapter, tmp_path):
    result_file = tmp_path / "result.json"
    env = {**os.environ, "DOPPEL_RESULT_FILE": str(result_file)}
    result = doppel(
        "chat",
        "--adapter",
        str(rank64_adapter),
        "--vllm-url",
        vllm_server.base_url,
        "--person",
        "Pat",
        "--once",
        "hi",
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "greater than max_lora_rank" in result.stderr
    assert json.loads(result_file.read_text()) == {
        "ok": False,
        "kind": "bad_input",
        "reason": result.stderr.strip().removeprefix("doppel: error: "),
    }


def test_interactive_chat_in_process_keeps_the_thread(tiny_model, trained_adapter):
    result = doppel(
        "chat",
        *_greedy(trained_adapter, STYLE_PERSON, "--base-model", str(tiny_model)),
        stdin=f"{QUESTION}\n\nBob: and the retro?\n/quit\nnot sent\n",
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if f"{STYLE_PERSON}> " in line]
    assert len(replies) == 2
    assert all(STYLE_MARKER in line for line in replies)
    assert "not sent" not in result.stdout


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--adapter", "{missing}", "--base-model", "{model}"], "does not exist"),
        (["--adapter", "{empty}", "--base-model", "{model}"], "no adapter_config.json"),
        (["--adapter", "{adapter}"], "exactly one of --vllm-url URL or --base-model PATH"),
        (["--adapter", "{adapter}", "--base-model", "{model}", "--vllm-url", "{url}"], "exactly one"),
        (["--adapter", "{adapter}", "--base-model", "{empty}"], "base model"),
        (["--adapter", "{adapter}", "--vllm-url", "{url}"], "no vLLM server answers"),
        (["--adapter", "{anonymous}", "--base-model", "{model}"], "--person"),
        (["--adapter", "{adapter}", "--base-model", "{model}", "--opening-temperature", "-1"], "0 or more"),
        (["--adapter", "{adapter}", "--base-model", "{model}", "--temperature", "-0.2"], "0 or more"),
        (["--adapter", "{adapter}", "--base-model", "{model}", "--max-tokens", "0"], "at least 1"),
        (["--adapter", "{adapter}", "--vllm-url", "{url}", "--max-tokens", "-5"], "at least 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, reason, tmp_path, tiny_model, trained_adapter):
    (tmp_path / "empty").mkdir()
    # An adapter whose metrics.json is gone does not say whose doppel it is.
    anonymous = shutil.copytree(trained_adapter, tmp_path / "anonymous")
    (anonymous / "metrics.json").unlink()
    values = {
        "anonymous": str(anonymous),
        "missing": str(tmp_path / "missing"),
        "empty": str(tmp_path / "empty"),
        "model": str(tiny_model),
        "adapter": str(trained_adapter),
        "url": f"http://127.0.0.1:{free_port()}",
    }
    person = [] if reason == "--person" else ["--person", "Pat"]
    argv = ["chat", *[a.format(**values) for a in args], *person, "--once", "hi"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert reason in result.output
    assert "Traceback" not in result.output


def test_the_opening_is_sampled_unless_asked_otherwise(tiny_model, trained_adapter):
    def reply(seed: int, *sampling: str) -> str:
        argv = ["--adapter", str(trained_adapter), "--base-model", str(tiny_model), "--person", STYLE_PERSON]
        argv += ["--temperature", "0", "--max-tokens", "6", "--seed", str(seed), *sampling, "--once", "hi"]
        result = CliRunner().invoke(main, ["chat", *argv, "--json"])
        assert result.exit_code == 0, result.output
        return str(json.loads(result.stdout.strip().splitlines()[-1])["reply"])

    # The tiny adapter is sure to open with "Yarr!": at 1.0 (the default) its opening stays; hotter, the
    # opening varies with the seed, the rest greedy; at 0 every reply is the greedy one.
    greedy = reply(0, "--opening-temperature", "0")
    assert {reply(seed) for seed in range(3)} == {greedy}
    assert len({reply(seed, "--opening-temperature", "8") for seed in range(6)}) > 1
    assert {reply(seed, "--opening-temperature", "0") for seed in range(3)} == {greedy}


def test_person_defaults_to_the_one_recorded_at_training(tiny_model, trained_adapter):
    result = doppel(
        "chat",
        "--adapter",
        str(trained_adapter),
        "--base-model",
        str(tiny_model),
        "--max-tokens",
        "8",
        stdin="hi\n",
    )
    assert result.returncode == 0, result.stderr
    assert f"{STYLE_PERSON}> " in result.stdout
