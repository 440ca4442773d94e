"""`doppel chat`: talk to a doppel in the terminal, through vLLM or a base model run in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from doppel.cli.common import run_stage
from doppel.errors import BadInput


@click.command()
@click.option(
    "--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path), help="LoRA adapter directory."
)
@click.option("--vllm-url", help="Chat through this vLLM server (it must see the adapter at the same path).")
@click.option("--base-model", help="Or run this base model in-process (built-in name or directory).")
@click.option(
    "--person", help="Whose doppel this is (named in the system prompt); default: as recorded at training."
)
@click.option("--once", "message", help="Send one message, print the reply and exit.")
@click.option("--temperature", type=float, help="Sampling temperature (default 0.2).")
@click.option("--max-tokens", type=int, help="Longest reply in tokens (default 1024).")
@click.option("--seed", type=int, help="Sampling seed, for repeatable replies.")
@run_stage
def chat(
    adapter_dir: Path,
    vllm_url: str | None,
    base_model: str | None,
    person: str | None,
    message: str | None,
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
) -> dict[str, Any]:
    """Chat with a doppel in the terminal; replies stream as they are generated."""
    from doppel.serve.backend import DEFAULT_PARAMS
    from doppel.serve.chat import (
        ChatSession,
        adapter_person,
        check_adapter_dir,
        local_chat_backend,
        vllm_chat_backend,
    )

    if (vllm_url is None) == (base_model is None):
        raise BadInput("give exactly one of --vllm-url URL or --base-model PATH")
    adapter = check_adapter_dir(adapter_dir)
    person = person or adapter_person(adapter)
    if not person:
        raise BadInput("--person NAME is required: the adapter does not say whose doppel it is")
    params = DEFAULT_PARAMS.override(temperature=temperature, max_tokens=max_tokens, seed=seed)
    if vllm_url:
        opened = vllm_chat_backend(vllm_url, adapter)
    else:
        from doppel.train.base_models import resolve_base_model

        opened = local_chat_backend(resolve_base_model(str(base_model)), adapter)
    turns = 0
    with opened as (backend, name):
        session = ChatSession(backend, name, person, params=params)
        interactive = message is None
        while True:
            if interactive:
                try:
                    message = input("you> ").strip()
                except EOFError:
                    break
                if message in ("/quit", "/exit"):
                    break
                if not message:
                    continue
                click.echo(f"{person}> ", nl=False)
            for piece in session.reply(message or ""):
                click.echo(piece, nl=False)
            click.echo()
            turns += 1
            if not interactive:
                break
    return {"turns": turns, "adapter": str(adapter)}
