"""Writing a model whose parameters ZeRO-3 has partitioned, without leaving any rank waiting."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .distributed import all_gather_objects


def save_consolidated(params: list[torch.nn.Parameter], zero3: bool, writer: bool, write: Callable[[], None],
                      where: str) -> None:
    """Run ``write`` on the writer rank with every parameter whole; raise its failure on every rank.

    Collective: every rank must call it. Under ZeRO-3 each rank holds only a
    slice of each parameter, so every rank gathers the full parameters for the
    duration of the write (enough up to a few billion parameters). A failure on
    the writer is sent to the others, which would otherwise wait forever in
    their next collective.
    """
    import deepspeed

    gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    error = None
    with gathered:
        if writer:
            try:
                write()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error = f"saving to {where} failed: {type(e).__name__}: {e}"
    errors = [e for e in all_gather_objects(error) if e]
    if errors:
        raise OSError(errors[0])
