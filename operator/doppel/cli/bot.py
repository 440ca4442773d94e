"""`doppel bot`: run the Slack bot (HTTP events or Socket Mode), configured from the environment."""

from __future__ import annotations

from typing import Any

import click

from doppel.cli.common import run_stage
from doppel.errors import BadInput


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP address (in a pod: 0.0.0.0).")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--socket-mode", is_flag=True, help="Connect out over Socket Mode (needs SLACK_APP_TOKEN).")
@click.option("--kube-server", help="Kubernetes API URL; default: in-cluster config, else $KUBECONFIG.")
@run_stage
def bot(host: str, port: int, socket_mode: bool, kube_server: str | None) -> dict[str, Any]:
    """Run the Slack bot: @mentions, /doppel, OAuth install. Configured from the environment
    (SLACK_SIGNING_SECRET, SLACK_BOT_TOKEN or SLACK_CLIENT_ID/SECRET, VLLM_URL, ...: see the README)."""
    import asyncio
    import logging

    from doppel.bot.config import BotConfig
    from doppel.bot.server import create_bot

    config = BotConfig.from_env()
    if socket_mode and not config.app_token:
        raise BadInput("--socket-mode needs SLACK_APP_TOKEN (an app-level xapp- token)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = create_bot(config, kube_server=kube_server)
    asyncio.run(server.serve_socket_mode() if socket_mode else server.serve(host, port))
    return {"mode": "socket" if socket_mode else "http"}
