"""What this CPU computes fast: training steps and generation use bfloat16 autocast where it is native."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (without, autocast emulates it and is slower)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bf16_autocast(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on the CPU when `enabled`, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
