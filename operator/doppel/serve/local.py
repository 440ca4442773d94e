"""The in-process chat backend of the embedded mode: transformers + peft, no server.

Several LoRA adapters stay loaded on one base model; a batch mixes them row by row (PEFT's `adapter_names=`,
with `BASE_ADAPTER` for rows on the bare base model). The prompt is the base tokenizer's chat template with a
generation prompt, which is what vLLM renders for the same messages, so a conversation built by
`build_conversation` reads the same to both backends.

Sampling (a sampled opening, a temperature) is `RowSampler`'s: each row draws from its own generator, seeded
from the request's seed and the row's prompt, as vLLM seeds each request. A seeded reply is then the same
whether it was asked alone or in a batch, whatever else the batch asked and in whichever order.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from doppel.cpu import bf16_autocast, cpu_has_bf16
from doppel.serve.addressing import Addressing, banned_token_ids, banned_words
from doppel.serve.backend import BASE_ADAPTER, DEFAULT_PARAMS, GenerationParams, Messages
from doppel.serve.errors import AdapterNotFound, BaseModelMismatch, InvalidAdapter, UnknownModel


class LocalBackend:
    """`ChatBackend` running the base model and its adapters in this process: float32 on CPU, bfloat16 on a
    GPU when there is one (the train Job's fidelity report runs there). On a CPU that computes bfloat16
    natively, generation runs in bfloat16 autocast (`bf16`, None: when it does): 1.5x as fast on 2 cores
    for SmolLM2 (tests/bench/bench_serve.py); the weights stay float32. Reports pass `bf16=False`: greedy
    replies differ a little between the two, and a figure must not depend on the CPU."""

    def __init__(
        self, base_model: Path, adapters: Mapping[str, Path] | None = None, *, bf16: bool | None = None
    ) -> None:
        base_model = Path(base_model)
        if not (base_model / "config.json").is_file():
            raise UnknownModel(f"no model at {base_model} (config.json missing)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        # Left padding: in a batch every row's generation starts right after its own prompt.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        on_gpu = torch.cuda.is_available()
        self.model: PreTrainedModel | PeftModel = AutoModelForCausalLM.from_pretrained(
            str(base_model), dtype=torch.bfloat16 if on_gpu else torch.float32
        )
        if on_gpu:
            self.model.to("cuda")
        self.model.eval()
        self.bf16 = not on_gpu and (cpu_has_bf16() if bf16 is None else bf16)
        # PEFT routes rows to adapters with per-call hooks: one generation at a time.
        self._lock = threading.Lock()
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config) if isinstance(self.model, PeftModel) else []

    def add_adapter(self, name: str, path: Path) -> None:
        """Load the PEFT adapter at `path` as `name` (alongside those already loaded)."""
        path = Path(path)
        if name == BASE_ADAPTER:
            raise InvalidAdapter(f"{BASE_ADAPTER!r} names the base model, not an adapter")
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotFound(f"no adapter at {path} (adapter_config.json missing)")
        with self._lock:
            base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
            # Check before PEFT touches the model: a failed load can leave layers injected into it.
            _check_fits(base, path)
            # PEFT upcasts bf16/fp16 adapters to float32 by default: on a bf16 base that doubles each
            # adapter's GPU memory (measured: 308 MiB for a 154 MiB Qwen2.5-7B adapter) for no gain.
            upcast = base.dtype == torch.float32
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name, autocast_adapter_dtype=upcast)
                else:
                    self.model = PeftModel.from_pretrained(
                        self.model, str(path), adapter_name=name, autocast_adapter_dtype=upcast
                    )
            except (ValueError, OSError, RuntimeError) as exc:
                if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                    self.model.delete_adapter(name)
                raise InvalidAdapter(f"cannot load adapter {path}: {exc}") from exc
            self.model.eval()

    def remove_adapter(self, name: str) -> None:
        self._check_adapter(name)
        assert isinstance(self.model, PeftModel)
        with self._lock:
            self.model.delete_adapter(name)

    def render_prompt(self, messages: Messages) -> str:
        """The prompt text the model sees for `messages`."""
        return str(
            self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
            )
        )

    def prompt_token_ids(self, messages: Messages) -> list[int]:
        # The template already holds any special tokens; adding them again would double the BOS.
        return list(self.tokenizer(self.render_prompt(messages), add_special_tokens=False)["input_ids"])

    def complete(self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS) -> str:
        return self.complete_batch([(adapter, messages)], params)[0]

    def complete_batch(
        self, requests: Sequence[tuple[str, Messages]], params: GenerationParams = DEFAULT_PARAMS
    ) -> list[str]:
        """Replies to several (adapter, messages) pairs, generated together in one batch."""
        kwargs = self._generate_kwargs([a for a, _ in requests], [m for _, m in requests], params)
        with self._lock, torch.inference_mode(), bf16_autocast(self.bf16):
            output = self.model.generate(**kwargs)
        prompt_len = kwargs["input_ids"].shape[1]
        texts = self.tokenizer.batch_decode(output[:, prompt_len:], skip_special_tokens=True)
        return [Addressing.of(m).repair(t) for (_, m), t in zip(requests, texts, strict=True)]

    def stream(
        self, adapter: str, messages: Messages, params: GenerationParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        kwargs = self._generate_kwargs([adapter], [messages], params)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with self._lock, torch.inference_mode(), bf16_autocast(self.bf16):
                    self.model.generate(**kwargs, streamer=streamer)
            except BaseException as exc:  # surfaced in the consuming thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, name="doppel-generate", daemon=True)
        thread.start()
        yield from Addressing.of(messages).repair_stream(piece for piece in streamer if piece)
        thread.join()
        if failure:
            raise failure[0]

    def _check_adapter(self, adapter: str) -> None:
        if adapter != BASE_ADAPTER and adapter not in self.adapters:
            known = ", ".join([BASE_ADAPTER, *self.adapters])
            raise UnknownModel(f"the model {adapter!r} does not exist here (loaded: {known})")

    def _generate_kwargs(
        self, adapters: Sequence[str], conversations: Sequence[Messages], params: GenerationParams
    ) -> dict[str, Any]:
        for adapter in adapters:
            self._check_adapter(adapter)
        prompts = [self.render_prompt(m) for m in conversations]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        # Like vLLM, never generate past the model's context window.
        room = self.model.config.max_position_embeddings - inputs["input_ids"].shape[1]
        if room <= 0:
            raise UnknownModel(f"the prompt ({inputs['input_ids'].shape[1]} tokens) fills the whole context")
        kwargs: dict[str, Any] = {
            **inputs,
            "max_new_tokens": min(params.max_tokens, room),
            # Greedy for transformers: a sampled token is `RowSampler`'s, the only one it leaves.
            "do_sample": False,
            "repetition_penalty": params.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if params.temperature > 0 or params.samples_opening:
            prompt_ids = [
                row[mask.bool()].tolist()
                for row, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
            ]
            sampler = RowSampler(inputs["input_ids"].shape[1], params, prompt_ids)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        banned = banned_token_ids(self.tokenizer, banned_words(conversations))
        if banned:  # the person never addresses themself (doppel.serve.addressing)
            kwargs["bad_words_ids"] = banned
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = list(adapters)
        return kwargs


class RowSampler(LogitsProcessor):
    """Samples each row's next token and masks every other token of that position, so that transformers'
    greedy decoding then takes it. The reply's first token is sampled at `params.opening_temperature` when
    the opening is sampled (`GenerationParams.samples_opening`), the others at `params.temperature` (at
    0: left to greedy decoding), within top-k and top-p, as vLLM samples. transformers runs it after the
    repetition penalty and the banned words, as vLLM does (`opening_body`).

    Each row draws from its own generator, seeded from `params.seed` and the row's prompt (`row_seed`): one
    generator for the batch would give a row the draws its place in the batch left it, so that a reply would
    depend on what else was asked with it. Without a seed, the rows draw from torch's global generator."""

    def __init__(
        self, prompt_length: int, params: GenerationParams, prompt_ids: Sequence[Sequence[int]]
    ) -> None:
        self.prompt_length = prompt_length
        self.opening = _warpers(params.opening_temperature, params) if params.samples_opening else None
        self.rest = _warpers(params.temperature, params) if params.temperature > 0 else None
        self.seeds = [None if params.seed is None else row_seed(params.seed, ids) for ids in prompt_ids]
        self.generators: list[torch.Generator | None] | None = None  # made on the logits' device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        opening = input_ids.shape[1] == self.prompt_length
        warpers = self.opening if opening and self.opening is not None else self.rest
        if warpers is None:
            return scores
        if self.generators is None:
            self.generators = [
                None if seed is None else torch.Generator(device=scores.device).manual_seed(seed)
                for seed in self.seeds
            ]
        warped = scores.float()
        for warper in warpers:
            warped = warper(input_ids, warped)
        probs = torch.softmax(warped, dim=-1)
        # One draw per row and step, finished rows included: a row's draws never hang on another's length.
        chosen = torch.cat(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)]
        )
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)


def row_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """A row's generator seed: the request's seed and the row's prompt token ids, hashed (stable across
    processes, unlike `hash`)."""
    digest = hashlib.blake2b(json.dumps([seed, list(prompt_ids)]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _warpers(temperature: float | None, params: GenerationParams) -> list[LogitsProcessor]:
    assert temperature is not None and temperature > 0
    warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers


def _check_fits(base: torch.nn.Module, path: Path) -> None:
    """Raise `BaseModelMismatch` unless every LoRA matrix in the adapter at `path` fits a base module."""
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterNotFound(f"no adapter weights at {weights}")
    with safe_open(str(weights), framework="pt") as tensors:
        shapes = {key: tensors.get_slice(key).get_shape() for key in tensors.keys()}  # noqa: SIM118
    for key, shape in shapes.items():
        # PEFT saves "base_model.model.<module path>.lora_A.weight" with lora_A [r, in] and lora_B [out, r].
        module_path, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        try:
            module = base.get_submodule(module_path)
        except AttributeError:
            raise BaseModelMismatch(
                f"adapter {path} targets {module_path}, absent from this base model"
            ) from None
        is_a = kind.startswith("A")
        expected = getattr(module, "in_features" if is_a else "out_features", None)
        actual = shape[1] if is_a else shape[0]
        if expected is not None and actual != expected:
            raise BaseModelMismatch(
                f"adapter {path} does not fit this base model: {module_path} has {expected} features, "
                f"the adapter {actual}"
            )
