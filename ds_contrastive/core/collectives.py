"""The few collectives of the step, written so that they read like the math.

Shards may differ in size between ranks: rows are padded to the largest shard
for the collective and the true counts travel alongside.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .runtime import world


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (small Python objects only)."""
    _, size = world()
    if size == 1:
        return [obj]
    out: list[object] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def first_error(error: str | None) -> str | None:
    """The first error any rank reports (None when none does), on every rank; collective.

    A failure seen by one rank (a write on rank 0, a missing file) must stop
    every rank: the others would otherwise wait in their next collective.
    """
    return next((e for e in all_gather_objects(error) if e), None)


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different counts."""
    rank, size = world()
    if size == 1:
        return local
    width = max(counts)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: counts[rank]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def sum_to_owners(global_rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Sum each rank's contribution to every global row; return this rank's rows.

    This is the adjoint of :func:`gather_rows`: rank r receives
    sum over ranks s of ``global_rows_s[rows of r]``.
    """
    rank, size = world()
    if size == 1:
        return global_rows
    offsets = [sum(counts[:r]) for r in range(size)]
    width = max(counts)
    padded = global_rows.new_zeros((size, width, *global_rows.shape[1:]))
    for r in range(size):
        padded[r, : counts[r]] = global_rows[offsets[r] : offsets[r] + counts[r]]
    if dist.get_backend() == "nccl":
        mine = torch.empty_like(padded[0])
        dist.reduce_scatter_tensor(mine, padded)
    else:  # gloo has no reduce-scatter: reduce everything, keep our block
        dist.all_reduce(padded)
        mine = padded[rank]
    return mine[: counts[rank]]


def sum_scalars(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (one collective)."""
    _, size = world()
    if size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's ``value`` (one collective)."""
    _, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
