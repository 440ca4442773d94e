"""`doppel make-tiny-model`: a tiny Llama-architecture model and tokenizer, built offline in seconds.

Tests and the offline demo need a real causal LM that transformers, PEFT and the vLLM CPU server all load,
without downloading anything. Weights are random; the tokenizer is a byte-level BPE trained on a little
built-in text, so any string round-trips. head_dim is 64 because vLLM's CPU attention kernels reject
smaller heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from doppel.fsutil import atomic_directory

# The name under which tests serve the tiny model on vLLM (`--served-model-name`).
TINY_MODEL_NAME = "doppel-tiny"

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]

# Llama-3's layout. Every turn ends with <|eot_id|>, the tokenizer's eos, so generation stops after a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

VOCAB_SIZE = 1024

# Enough varied text for a few hundred useful merges; the byte alphabet covers everything else.
_CORPUS = """\
You are chatting with colleagues on Slack. Reply as they would, in their tone, length and habits.
Hi there! Can you take a look at the deploy? The build on main is red again since this morning.
Sure, I will check the logs after lunch. It looks like a flaky test in the payments service.
Thanks a lot, that would be great. Let me know if you need a hand with the rollback.
Did anyone see the alert about the database latency? The dashboard shows a spike at noon.
Yes, it was the nightly backup running early. I moved the schedule back to two in the morning.
What time is the standup tomorrow? I have a dentist appointment at ten.
We moved it to half past nine, so you should be fine. See you there!
Could you review my pull request when you have a minute? It is a small change to the parser.
Looks good to me, just one comment about the error message. Approved.
The new release notes are in the wiki. Please read them before the customer call on Friday.
Happy birthday! Cake is in the kitchen on the third floor, first come first served.
I think we should write a design doc first, then split the work into small issues.
Agreed. I will draft the doc today and share it in the channel for comments.
Ahoy, yarr, matey, ship, sea, treasure, captain, crew, sail, anchor, parrot, island, map.
Meeting, review, deploy, release, bug, fix, test, build, merge, branch, commit, ticket, sprint.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday morning afternoon evening night today.
one two three four five six seven eight nine ten hundred thousand 0 1 2 3 4 5 6 7 8 9 : ; , . ! ? ( ) #
"""


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama-3-style special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Keep character offsets exact (used for the assistant-only label mask).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD, model_max_length=2048
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(out: Path, *, seed: int = 0) -> Path:
    """Write the tiny model (HF format) to `out`, atomically; the same seed gives the same files."""
    out = Path(out)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        # With the usual 0.02 a random lm_head caps logits near +-3 behind the final RMSNorm, so even a
        # perfectly fitted adapter could not predict confidently; 0.1 leaves room to learn a style.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # vLLM stops on any of these ids; <|end_of_text|> too, in case a prompt is rendered without the template.
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=config.pad_token_id,
    )
    with atomic_directory(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        generation.save_pretrained(tmp)
        # chat_template inside tokenizer_config.json, which every loader (vLLM included) reads.
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        _check_chat_template_saved(tmp)
    return out


def _check_chat_template_saved(directory: Path) -> None:
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config.get("chat_template") != CHAT_TEMPLATE:
        raise RuntimeError("tokenizer_config.json lacks the chat template")
