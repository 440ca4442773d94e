"""What every `doppel` command shares: the exit-code contract, the result file and shared option texts.

Every subcommand goes through `run_stage`, which gives the whole CLI one behaviour:
- exit 0 on success, 2 on `BadInput` (one line on stderr), 1 on anything else (one line, plus the
  traceback with `--debug`);
- a JSON summary of the result (or of the failure) written to `$DOPPEL_RESULT_FILE` when it is set. In a
  Kubernetes Job that variable points at the container's termination-message path, which is how the
  operator learns a Job's outcome without reading its logs.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from doppel.errors import BadInput

RESULT_FILE_ENV = "DOPPEL_RESULT_FILE"
# Kubernetes keeps at most 4096 bytes of a termination message.
RESULT_FILE_LIMIT = 4096
_ESSENTIAL = ("ok", "reason", "kind")
BASE_MODEL_HELP = "Built-in model name (smollm2-135m), local model directory or Hugging Face model id."

F = TypeVar("F", bound=Callable[..., Any])


def write_result(result: dict[str, Any]) -> None:
    """Write `result` as compact JSON to `$DOPPEL_RESULT_FILE`, if set, within Kubernetes' size limit."""
    target = os.environ.get(RESULT_FILE_ENV)
    if not target:
        return
    Path(target).write_text(_within_limit(result), encoding="utf-8")


def _within_limit(result: dict[str, Any]) -> str:
    """`result` as compact JSON of at most RESULT_FILE_LIMIT bytes: over it, the largest entries are left
    out first (named under "truncated"), so that the outcome and the small figures the operator reads
    (steps, losses, the gate's verdict) survive a result that grew."""
    kept = dict(result)
    dropped: list[str] = []

    def encoded() -> str:
        shown = {**kept, "truncated": dropped} if dropped else kept
        return json.dumps(shown, separators=(",", ":"), sort_keys=True, default=str)

    def size(key: str) -> int:
        return len(json.dumps(kept[key], default=str).encode())

    text = encoded()
    while len(text.encode()) > RESULT_FILE_LIMIT:
        optional = [k for k in kept if k not in _ESSENTIAL]
        if not optional:
            return json.dumps({**kept, "reason": str(kept.get("reason", ""))[: RESULT_FILE_LIMIT // 2]})
        largest = max(optional, key=size)
        del kept[largest]
        dropped.append(largest)
        text = encoded()
    return text


# A volume that refuses writes: no permission, mounted read-only, or full.
STORAGE_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only",
                  errno.ENOSPC: "full", errno.EDQUOT: "over its quota"}  # fmt: skip


def storage_problem(exc: OSError) -> str | None:
    """One line saying which path could not be written and as whom, for the errors a volume gives; None
    for other errors. (The operator turns it into StorageWritable=False.)"""
    what = STORAGE_ERRNOS.get(exc.errno or 0)
    if what is None or not exc.filename:
        return None
    return (
        f"cannot write {exc.filename}: {what} ({exc.strerror}), as uid {os.getuid()} gid {os.getgid()}: "
        "the shared volume must let this user create files there"
    )


def run_stage(func: F) -> F:
    """Wrap a command body that returns a summary dict (or None) with the CLI's exit-code contract."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            summary = func(*args, **kwargs) or {}
        except BadInput as exc:
            write_result({"ok": False, "kind": "bad_input", "reason": str(exc)})
            click.echo(f"doppel: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("doppel: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            # A volume that refuses writes says which path and as whom; any other error is one line too.
            storage = storage_problem(exc) if isinstance(exc, OSError) else None
            if storage is not None:
                write_result({"ok": False, "kind": "storage", "reason": storage})
                click.echo(f"doppel: failed: {storage}", err=True)
                sys.exit(1)
            write_result({"ok": False, "kind": "error", "reason": f"{type(exc).__name__}: {exc}"})
            if debug:
                traceback.print_exc()
            click.echo(f"doppel: failed: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
        write_result({"ok": True, **summary})

    return wrapper  # type: ignore[return-value]
