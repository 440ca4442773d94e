"""`doppel local --socket-mode`: the Slack bot over Socket Mode, answering mentions with the run's adapter
in this process (no cluster, no vLLM)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from doppel.errors import BadInput
from doppel.local.outcome import Outcome
from doppel.local.settings import slug

if TYPE_CHECKING:  # the bot's modules load only for --socket-mode
    from doppel.bot.config import BotConfig
    from doppel.bot.server import Bot

# Where the local bot keeps its one doppel, whatever the workspace (there is no cluster to map teams).
LOCAL_NAMESPACE = "local"


def socket_mode_config(slack_token: str | None, env: Mapping[str, str] | None = None) -> BotConfig:
    """The bot's settings for --socket-mode, from the environment as `doppel bot` reads them (the bot token
    defaults to --slack-token); checked before any work is done."""
    from doppel.bot.config import BotConfig

    values = dict(os.environ if env is None else env)
    if slack_token and not values.get("SLACK_BOT_TOKEN"):
        values["SLACK_BOT_TOKEN"] = slack_token
    config = BotConfig.from_env(values)
    if config.oauth:
        raise BadInput("--socket-mode serves one workspace: set SLACK_BOT_TOKEN (or pass --slack-token)")
    if not config.app_token:
        raise BadInput("--socket-mode needs SLACK_APP_TOKEN (an app-level xapp- token)")
    # One machine, one doppel: whichever workspace the token belongs to finds it in the same place.
    return dataclasses.replace(config, team_namespaces={}, namespace_template=LOCAL_NAMESPACE)


def local_bot(outcome: Outcome, config: BotConfig) -> Bot:
    """The Slack bot answering mentions with this run's adapter, in this process: no cluster, no vLLM."""
    from doppel.bot.app import backend_chat
    from doppel.bot.directory import MemoryDirectory
    from doppel.bot.logic import object_name
    from doppel.bot.server import create_bot
    from doppel.serve.local import LocalBackend

    served = slug(outcome.person_id)
    backend = LocalBackend(outcome.base_model, {served: outcome.adapter})
    directory = MemoryDirectory()
    # The DoppelUser the operator would have made Ready, reduced to what the bot reads.
    directory.add(
        {
            "apiVersion": "doppel.dev/v1alpha1",
            "kind": "DoppelUser",
            "metadata": {"name": object_name(outcome.handle), "namespace": config.namespace_for("")},
            "spec": {"target": {"userId": outcome.person_id, "realName": outcome.person_name}},
            "status": _status(outcome, served),
        }
    )
    chat = backend_chat(backend, config.generation())
    data_dir = outcome.data_dir
    # Feedback and the person's corrections go to their data directory, where the next run trains on them.
    return create_bot(config, chat=chat, kube=directory, feedback_dir=lambda _ns, _doppel: data_dir)


def _status(outcome: Outcome, served: str) -> dict[str, Any]:
    """The status the operator would have written: Ready with the served adapter and its report's
    headline (camelCase, as `status.eval`), and the fidelity gate's refusal when this run's adapter was
    worse than the one serving (`/doppel status` says so)."""
    from doppel.api import EvalSummary
    from doppel.local.outcome import headline_of

    status: dict[str, Any] = {
        "phase": "Ready",
        "samples": outcome.samples,
        "adapter": {"servedName": served, "path": str(outcome.adapter), "version": 1},
    }
    figures = headline_of(outcome.fidelity)
    if figures:
        status["eval"] = EvalSummary.model_validate(figures).model_dump(by_alias=True, exclude_none=True)
    gate = outcome.gate
    if gate is not None and not gate.promoted:
        status["reason"], status["message"] = "FidelityRegressed", gate.line()
    return status
