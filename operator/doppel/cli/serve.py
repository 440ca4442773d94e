"""`doppel chat`: talk to a doppel in the terminal, through vLLM or a base model run in-process."""

from __future__ import annotations

import json
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
@click.option(
    "--opening-temperature",
    type=float,
    help="Temperature of each reply's first token, for the person's own mix of openings (default 1.0; "
    "0: the same as --temperature).",
)
@click.option("--max-tokens", type=int, help="Longest reply in tokens (default 1024).")
@click.option("--seed", type=int, help="Sampling seed, for repeatable replies.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='With --once: print {"reply", "sources": [{"channel", "ts", "permalink", "text"}], "abstained"}.',
)
@click.option(
    "--memory/--no-memory", default=True, show_default=True, help="Use the memory beside the adapter."
)
@click.option(
    "--workspace-url", help="The workspace's address (https://NAME.slack.com), for source permalinks."
)
@run_stage
def chat(
    adapter_dir: Path,
    vllm_url: str | None,
    base_model: str | None,
    person: str | None,
    message: str | None,
    temperature: float | None,
    opening_temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    as_json: bool,
    memory: bool,
    workspace_url: str | None,
) -> dict[str, Any]:
    """Chat with a doppel in the terminal; replies stream as they are generated."""
    from doppel.memory.prompt import MemorySettings
    from doppel.serve.backend import DEFAULT_PARAMS
    from doppel.serve.chat import (
        ChatSession,
        adapter_memory,
        adapter_person,
        check_adapter_dir,
        local_chat_backend,
        vllm_chat_backend,
    )

    if (vllm_url is None) == (base_model is None):
        raise BadInput("give exactly one of --vllm-url URL or --base-model PATH")
    if as_json and message is None:
        raise BadInput("--json answers one message: give it with --once")
    adapter = check_adapter_dir(adapter_dir)
    person = person or adapter_person(adapter)
    if not person:
        raise BadInput("--person NAME is required: the adapter does not say whose doppel it is")
    for flag, value in (("--temperature", temperature), ("--opening-temperature", opening_temperature)):
        if value is not None and value < 0:
            raise BadInput(f"{flag} must be 0 or more, got {value}")
    if max_tokens is not None and max_tokens < 1:
        raise BadInput(f"--max-tokens must be at least 1, got {max_tokens}")
    params = DEFAULT_PARAMS.override(
        temperature=temperature, opening_temperature=opening_temperature, max_tokens=max_tokens, seed=seed
    )
    index = adapter_memory(adapter) if memory else None
    if vllm_url:
        opened = vllm_chat_backend(vllm_url, adapter)
    else:
        from doppel.train.base_models import resolve_base_model

        opened = local_chat_backend(resolve_base_model(str(base_model)), adapter)
    turns = 0
    with opened as (backend, name):
        settings = MemorySettings.from_env()
        session = ChatSession(backend, name, person, params=params, memory=index, memory_settings=settings)
        if as_json:
            reply = "".join(session.reply(message or "")).strip()
            sources = session.cited.sources(workspace_url)
            click.echo(json.dumps({"reply": reply, "sources": sources, "abstained": session.recall.abstain}))
            return {"turns": 1, "adapter": str(adapter)}
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
            for hit in session.cited.hits:  # where what the reply repeats was said, as Slack shows it
                link = hit.entry.source(workspace_url)["permalink"]
                where = f"  from #{hit.entry.channel}, {hit.entry.day()}" + (f": {link}" if link else "")
                click.echo(click.style(where, dim=True))
            turns += 1
            if not interactive:
                break
    return {"turns": turns, "adapter": str(adapter)}
