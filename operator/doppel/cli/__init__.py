"""The `doppel` command: thin glue between click and the pipeline stages.

The click group `main` is defined here and each command group lives in its own module:
- `common`: the exit-code contract (`run_stage`), the result file, option texts the commands share;
- `stages`: scrape, base-model, make-tiny-model, train, eval;
- `serve`: chat;
- `local`: local (the whole pipeline on one machine);
- `operator`: operator;
- `bot`: bot;
- `admin`: crd, cleanup.

Stage modules are imported inside the commands so that `doppel --help` stays fast and the slim image
(no torch) can run the commands it needs.
"""

from __future__ import annotations

import warnings

import click

from doppel import __version__
from doppel.cli.admin import cleanup, crd
from doppel.cli.bot import bot
from doppel.cli.common import run_stage
from doppel.cli.local import local
from doppel.cli.operator import operator_command
from doppel.cli.serve import chat
from doppel.cli.stages import (
    base_model_command,
    eval_command,
    make_tiny_model_command,
    scrape,
    train_command,
)

__all__ = ["main", "run_stage"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="doppel")
@click.option("--debug", is_flag=True, help="Print tracebacks of unexpected errors.")
def main(debug: bool) -> None:
    """doppel: clone a colleague into a Slack bot.

    Scrape a person's Slack messages, fine-tune a LoRA adapter, serve it on vLLM and answer @mentions in
    their voice. `doppel local --demo` runs the whole pipeline offline on this machine.
    """
    # PEFT and TRL read an attribute transformers 5 deprecated, on every adapter they load: not the user's
    # concern, and it would print between the stages' lines.
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)


for _command in (
    scrape,
    base_model_command,
    make_tiny_model_command,
    train_command,
    eval_command,
    chat,
    crd,
    operator_command,
    cleanup,
    bot,
    local,
):
    main.add_command(_command)
