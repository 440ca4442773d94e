"""Pytest fixtures: real vLLM CPU server fixtures (serving).

`VllmServer` runs the real vLLM OpenAI-compatible server (CPU build, its own virtualenv named by
$DOPPEL_VLLM_PYTHON) as a subprocess on 127.0.0.1. It is usable outside the fixture: the operator tests start
extra instances to play vLLM pods and restart them.

vLLM tests skip when $DOPPEL_VLLM_PYTHON is unset, unless $DOPPEL_REQUIRE_VLLM=1 (as `make test` sets), in
which case a missing server is a failure, not a silent skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

VLLM_PYTHON_ENV = "DOPPEL_VLLM_PYTHON"
REQUIRE_VLLM_ENV = "DOPPEL_REQUIRE_VLLM"
SERVED_MODEL_NAME = "doppel-tiny"
# Startup is ~30 s alone on 2 cores, several times that while the rest of the suite competes for them.
STARTUP_TIMEOUT_S = 600.0


def vllm_python() -> str:
    """The python of vLLM's virtualenv; skips the test, or fails it when vLLM is required."""
    python = os.environ.get(VLLM_PYTHON_ENV, "")
    required = os.environ.get(REQUIRE_VLLM_ENV) == "1"
    if python and Path(python).is_file():
        return python
    reason = (
        f"${VLLM_PYTHON_ENV} is not set"
        if not python
        else f"${VLLM_PYTHON_ENV}={python} does not exist (run `make vllm-venv`)"
    )
    if required:
        pytest.fail(f"the real vLLM server is required (${REQUIRE_VLLM_ENV}=1) but {reason}", pytrace=False)
    pytest.skip(f"real vLLM server not available: {reason}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmServer:
    """One real vLLM OpenAI server process serving `model_dir` with runtime LoRA loading enabled."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *,
        python: str | None = None,
        served_model_name: str = SERVED_MODEL_NAME,
        port: int | None = None,
        max_lora_rank: int = 32,
        extra_args: Sequence[str] = (),
        startup_timeout: float = STARTUP_TIMEOUT_S,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.python = python or vllm_python()
        self.served_model_name = served_model_name
        self.port = port or free_port()
        self.max_lora_rank = max_lora_rank
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-loras",
            "4",
            "--max-cpu-loras",
            "8",
            "--max-model-len",
            "512",
            "--dtype",
            "float32",
            "--gpu-memory-utilization",
            "0.3",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            # Without a bounded KV cache vLLM's CPU backend refuses to start on a 24 GB machine.
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            # Nothing beyond loopback exists here: never try a hub or report usage.
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        env.update(self.extra_env)
        # Our own virtualenv's paths must not leak into vLLM's interpreter.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self) -> None:
        """Start the server and wait until /health answers; raise with the log's tail if it does not."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== starting: {' '.join(self.command())}\n".encode())
            log.flush()
            # Own session: stop() signals the whole group, including vLLM's engine-core child.
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"vLLM exited with code {code} during startup\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not become healthy in {self.startup_timeout:.0f} s\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and its children at once, as a crashed pod would disappear."""
        self._signal_and_wait(signal.SIGKILL, grace=30.0)

    def stop(self) -> None:
        """SIGTERM the server and its children; SIGKILL what is left after a grace period."""
        if not self._signal_and_wait(signal.SIGTERM, grace=30.0):
            self._signal_and_wait(signal.SIGKILL, grace=30.0)

    def _signal_and_wait(self, sig: signal.Signals, grace: float) -> bool:
        process = self.process
        if process is None:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        # The engine-core child may outlive its parent for a moment; make sure the group is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        self.process = None
        return True

    def restart(self) -> None:
        """Stop and start a new process on the same port (loaded adapters are lost, as in a pod restart)."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"---- last {lines} lines of {self.log_path} ----\n{tail}"

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"VllmServer({self.base_url}, model={self.model_dir}, log={self.log_path})"


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """The real vLLM server serving the tiny model as `doppel-tiny`, one per test session.

    The server is shared: tests use their own adapter names and unload them. One test kills and restarts
    it (as a pod restart would), which drops every adapter: load what a test needs in that test
    (`load_adapter` is idempotent and cheap when the adapter is already there).
    """
    python = vllm_python()
    log_dir = tmp_path_factory.mktemp("vllm")
    server = VllmServer(tiny_model, log_dir / "vllm.log", python=python)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- adapters to serve, and adapters the server must refuse ---------------------------------------------

# The second style, beside model_fixtures' STYLE_PATTERN ("Yarr! ... matey").
ROBOT_PATTERN = "Beep boop. {topic} computed. Beep."
ROBOT_MARKER = "Beep boop"


@pytest.fixture(scope="session")
def robot_adapter(train_style_adapter: Callable[[str, str], Path]) -> Path:
    """An adapter of the tiny model trained to answer in ROBOT_PATTERN."""
    return train_style_adapter("robot", ROBOT_PATTERN)


@pytest.fixture(scope="session")
def heldout_messages(style_samples: Any) -> list[dict[str, str]]:
    """A thread never trained on, as `build_conversation` formats it, up to the person's reply."""
    first = json.loads(style_samples.heldout.read_text(encoding="utf-8").splitlines()[0])
    return first["messages"][:-1]


def _save_lora(model, rank: int, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def rank64_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter of the tiny model whose rank (64) exceeds the server's --max-lora-rank 32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return _save_lora(model, 64, tmp_path_factory.mktemp("r64") / "adapter")


@pytest.fixture(scope="session")
def foreign_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter of another (wider) Llama model: its matrices do not fit the tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = json.loads((tiny_model / "config.json").read_text())
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=ours["vocab_size"],
            hidden_size=2 * ours["hidden_size"],
            intermediate_size=128,
            num_hidden_layers=ours["num_hidden_layers"],
            num_attention_heads=2 * ours["num_attention_heads"],
            num_key_value_heads=2 * ours["num_attention_heads"],
            head_dim=64,
        )
    )
    return _save_lora(other, 8, tmp_path_factory.mktemp("foreign") / "adapter")
