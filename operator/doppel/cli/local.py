"""`doppel local`: the whole pipeline on this machine (see doppel.local), then optionally a terminal chat
or the Slack bot over Socket Mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from doppel.cli.common import BASE_MODEL_HELP, run_stage
from doppel.cli.serve import chat
from doppel.errors import BadInput


@click.command()
@click.option(
    "--demo",
    is_flag=True,
    help="Offline: synthetic workspace, SmolLM2-135M-Instruct (built once), CPU training.",
)
@click.option("--export", type=click.Path(path_type=Path), help="A Slack export ZIP to learn from.")
@click.option("--slack-token", help="Or scrape through the Slack Web API with this bot token.")
@click.option("--slack-api-url", help="Slack Web API base URL (proxies, emulators).")
@click.option("--slack-rate-scale", type=float, default=1.0, help="Multiply Slack's rate limits (emulators).")
@click.option("--user", help="Whose doppel to build: user ID, handle or real name (demo: margaret).")
@click.option(
    "--base-model", help=f"{BASE_MODEL_HELP} Default: smollm2-135m, on a CPU budget; doppel-tiny (tests)."
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("doppel-data"),
    show_default=True,
    help="Where everything is written; a second run reuses what is there.",
)
@click.option(
    "--max-steps",
    type=int,
    help="Optimizer steps to train (demo default 16); more than the samples hold pass over every one of "
    "them before any again.",
)
@click.option(
    "--cutoff-days",
    type=float,
    help="Learn from messages this recent (default 365; in an export: before the person's last message).",
)
@click.option(
    "--min-length",
    type=int,
    help="Shortest message of the person that makes a sample, in characters (default: their median message "
    "length, from 20 to 100).",
)
@click.option("--max-tokens", type=int, default=120, show_default=True, help="Longest demo reply (tokens).")
@click.option("--no-scrub", is_flag=True, help="Keep secrets, emails and phone numbers in the samples.")
@click.option(
    "--force-promotion",
    is_flag=True,
    help="Serve a newly trained adapter even when its fidelity report is worse than the serving one's.",
)
@click.option("--chat", "open_chat", is_flag=True, help="Then chat with the doppel in the terminal.")
@click.option("--socket-mode", is_flag=True, help="Then answer @mentions in Slack over Socket Mode.")
@run_stage
def local(
    demo: bool,
    export: Path | None,
    slack_token: str | None,
    slack_api_url: str | None,
    slack_rate_scale: float,
    user: str | None,
    base_model: str | None,
    workdir: Path,
    max_steps: int | None,
    cutoff_days: float | None,
    min_length: int | None,
    max_tokens: int,
    no_scrub: bool,
    force_promotion: bool,
    open_chat: bool,
    socket_mode: bool,
) -> dict[str, Any]:
    """Run the whole pipeline on this machine: scrape, train a LoRA adapter, show its replies."""
    from doppel.local import Settings, local_bot, report, run_local, socket_mode_config

    if open_chat and socket_mode:
        raise BadInput("give at most one of --chat and --socket-mode")
    bot_config = socket_mode_config(slack_token) if socket_mode else None
    settings = Settings(
        workdir=workdir,
        demo=demo,
        export=export,
        user=user,
        base_model=base_model,
        slack_token=slack_token,
        slack_api_url=slack_api_url,
        slack_rate_scale=slack_rate_scale,
        max_steps=max_steps,
        cutoff_days=cutoff_days,
        min_length=min_length,
        reply_tokens=max_tokens,
        scrub=not no_scrub,
        force_promotion=force_promotion,
    )
    outcome = run_local(settings)
    click.echo(report(outcome))
    if open_chat:
        click.get_current_context().invoke(
            chat,
            adapter_dir=outcome.adapter,
            base_model=str(outcome.base_model),
            person=outcome.person_name,
            max_tokens=max_tokens,
        )
    if bot_config is not None:
        import asyncio

        click.echo(f"{outcome.person_name}'s doppel answers @mentions over Socket Mode; Ctrl-C stops it.")
        asyncio.run(local_bot(outcome, bot_config).serve_socket_mode())
    return outcome.summary()
