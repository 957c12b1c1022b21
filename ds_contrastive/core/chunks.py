"""Length-sorted chunk planning for the two encoder passes.

A chunk is the set of sequences the encoder sees in one forward call; every
sequence in it is padded to the longest one in it. Sequences are sorted by
length and cut into contiguous chunks. Where to cut is a trade-off: each
forward call has a fixed cost (kernel launches, Python, DeepSpeed's hooks),
and each padded token costs compute (attention a little more, per row, for
longer rows). :func:`plan_fastest` picks the cuts that minimise that modelled
time, with the token budget as a memory cap only; :func:`plan_fill` is the
fixed rule of earlier versions (fill each chunk up to the budget), kept to
reproduce runs planned with it.

Every rank must run the same number of forward calls per pass (under ZeRO-3
each forward gathers parameters collectively), so after planning, ranks agree
on the largest chunk count and the others split chunks (or add dummy chunks)
to reach it: :func:`balance_chunk_count`.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

PLANNERS = ("fastest", "fill")


@dataclass(frozen=True)
class Chunk:
    """Indices of the sequences (into the rank's flat list) embedded together.

    ``dummy`` chunks exist only to keep the forward-call count equal across
    ranks: their embedding is discarded and their backward carries a zero
    gradient.
    """

    indices: tuple[int, ...]
    dummy: bool = False


@dataclass
class ChunkPlan:
    """The chunks of one rank for one step, in execution order."""

    chunks: list[Chunk] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chunks)


@dataclass(frozen=True)
class ChunkCosts:
    """Modelled seconds of one chunk of ``rows`` sequences padded to ``length`` tokens.

    ``call + token * rows * length + attention * rows * length**2``: a fixed
    cost per forward call, a cost per padded token, and the attention term
    that grows with the square of the length. Only the ratios between the
    three matter to the plan. They are measured on the machine the run uses
    (:mod:`ds_contrastive.core.calibration`), or given to reproduce a plan.
    """

    call: float
    token: float
    attention: float

    def __post_init__(self) -> None:
        values = (self.call, self.token, self.attention)
        if not all(np.isfinite(v) and v >= 0 for v in values) or self.call + self.token + self.attention <= 0:
            raise ValueError(f"chunk costs must be finite, >= 0 and not all 0, got {self}")

    def per_row(self, length: np.ndarray | int) -> np.ndarray | float:
        """Seconds one row adds to a chunk padded to ``length``."""
        return self.token * length + self.attention * np.square(length, dtype=np.float64)

    def of(self, rows: int, length: int) -> float:
        """Seconds of one chunk."""
        return self.call + rows * float(self.per_row(length))


def check_planning(planner: str, chunk_costs: ChunkCosts | Sequence[float] | None, retain_tokens: int | str,
                   retain_memory_fraction: float, retain_memory_gb: float | None) -> None:
    """Refuse planner and kept-graph settings that cannot work, naming the setting (ValueError).

    The one check behind ``CachedStep``, the training config and ``launch/train_hf.py``.
    """
    if planner not in PLANNERS:
        raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {planner!r}")
    if chunk_costs is not None and not isinstance(chunk_costs, ChunkCosts):
        if len(chunk_costs) != 3:
            raise ValueError(f"chunk_costs takes three numbers (call, token, attention seconds), got {chunk_costs}")
        ChunkCosts(*chunk_costs)
    if retain_tokens != "auto" and not (isinstance(retain_tokens, int) and retain_tokens >= 0):
        raise ValueError(f"retain_tokens must be 'auto' or an integer >= 0, got {retain_tokens!r}")
    if not 0 < retain_memory_fraction <= 1:
        raise ValueError(f"retain_memory_fraction must be in (0, 1], got {retain_memory_fraction}")
    if retain_memory_gb is not None and not retain_memory_gb >= 0:
        raise ValueError(f"retain_memory_gb must be >= 0 or None, got {retain_memory_gb}")


def parse_retain(value: int | str) -> int | str:
    """``retain_tokens`` from a config or command line: ``"auto"`` or a whole number of padded tokens."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def check_limits(token_budget: int | None, max_rows: int | None) -> None:
    """Refuse a missing or non-positive token budget / row limit, naming the setting."""
    if token_budget is None and max_rows is None:
        raise ValueError("chunking needs a token budget (chunk_tokens), a row limit (chunk_rows), or both")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"the chunk token budget (chunk_tokens) must be >= 1, got {token_budget}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"the chunk row limit (chunk_rows) must be >= 1, got {max_rows}")


def longest_first(lengths: list[int]) -> np.ndarray:
    """Sequence indices sorted longest first; ties keep their input order."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def row_limits(sorted_lengths: np.ndarray, token_budget: int | None, max_rows: int | None) -> np.ndarray:
    """Most rows a chunk padded to each length may hold (at least 1: a too-long sequence goes alone)."""
    rows = np.full(len(sorted_lengths), len(sorted_lengths), dtype=np.int64)
    if token_budget is not None:
        rows = np.minimum(rows, token_budget // np.maximum(sorted_lengths, 1))
    if max_rows is not None:
        rows = np.minimum(rows, max_rows)
    return np.maximum(rows, 1)


def plan_fill(lengths: list[int], token_budget: int | None, max_rows: int | None) -> ChunkPlan:
    """Fill each chunk up to the budget: the fixed rule of earlier versions.

    Sequences are sorted longest first; a chunk grows while
    ``rows * longest <= token_budget`` and ``rows <= max_rows``. Padding is
    then often large (one chunk spans lengths from 256 down to 60, all padded
    to 256): use :func:`plan_fastest` unless a run planned this way must be
    reproduced.
    """
    check_limits(token_budget, max_rows)
    order = longest_first(lengths)
    limits = row_limits(np.asarray(lengths, dtype=np.int64)[order], token_budget, max_rows)
    chunks, start = [], 0
    while start < len(order):
        end = min(start + int(limits[start]), len(order))
        chunks.append(Chunk(tuple(order[start:end].tolist())))
        start = end
    return ChunkPlan(chunks)


def plan_fastest(lengths: list[int], costs: ChunkCosts, token_budget: int | None, max_rows: int | None
                 ) -> ChunkPlan:
    """The cuts of the length-sorted sequences that minimise the modelled time; no chunk exceeds the limits.

    An exact dynamic programme over the sorted order. A chunk that starts
    inside a run of equal lengths can always start earlier in that run at no
    extra cost (its padding stays the same; the previous chunk only loses
    rows), unless it is full. So some optimal plan has every chunk either
    start where the length changes, or hold the most rows the limits allow.
    ``best[p]``, the least time to embed sequences ``p..n-1``, then takes one
    look-up for a position inside a run and one vectorised minimum over the
    reachable ends for each run start: O(n + runs x rows per chunk).
    """
    check_limits(token_budget, max_rows)
    n = len(lengths)
    order = longest_first(lengths)
    sorted_lengths = np.asarray(lengths, dtype=np.int64)[order]
    limits = row_limits(sorted_lengths, token_budget, max_rows)
    per_row = costs.per_row(sorted_lengths)
    best = np.full(n + 1, np.inf)
    best[n] = 0.0
    end = np.zeros(n + 1, dtype=np.int64)  # the chosen chunk starting at p ends before end[p]
    run_starts = np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1]]) if n else np.array([], int)
    run_ends = np.r_[run_starts[1:], n]
    for s, e in zip(run_starts[::-1].tolist(), run_ends[::-1].tolist()):
        rows, row_cost = int(limits[s]), float(per_row[s])
        inside = np.arange(s + 1, e)  # full chunks back to back, until the first one that ends past the run
        hops = -((inside - e) // rows)  # ceil((e - p) / rows)
        landing = inside + hops * rows
        best[inside] = np.where(landing <= n, hops * (costs.call + rows * row_cost) + best[np.minimum(landing, n)],
                                np.inf)
        end[inside] = inside + rows
        ends = np.arange(s + 1, min(s + rows, n) + 1)
        times = costs.call + (ends - s) * row_cost + best[ends]
        pick = len(times) - 1 - int(np.argmin(times[::-1]))  # on a tie, the fewer, larger chunks
        best[s], end[s] = times[pick], ends[pick]
    chunks, p = [], 0
    while p < n:
        chunks.append(Chunk(tuple(order[p:end[p]].tolist())))
        p = int(end[p])
    return ChunkPlan(chunks)


def plan_chunks(lengths: list[int], token_budget: int | None, max_rows: int | None,
                costs: ChunkCosts | None = None) -> ChunkPlan:
    """:func:`plan_fastest` under ``costs``; without costs, :func:`plan_fill`."""
    if costs is None:
        return plan_fill(lengths, token_budget, max_rows)
    return plan_fastest(lengths, costs, token_budget, max_rows)


def best_split(rows: tuple[int, ...], lengths: np.ndarray, costs: ChunkCosts) -> tuple[float, int]:
    """(added seconds, cut) of the cheapest way to cut one chunk (longest first) in two.

    Cutting after ``m`` rows adds one call and pads the remaining rows to the
    length of the first of them instead of the chunk's longest.
    """
    row_lengths = lengths[np.asarray(rows)]
    tail = np.arange(len(rows) - 1, 0, -1)  # rows after a cut at m = 1 .. r-1
    saved = tail * (costs.per_row(row_lengths[0]) - costs.per_row(row_lengths[1:]))
    best = np.flatnonzero(saved >= saved.max())  # among equal savings, the cut nearest the middle
    m = int(best[np.argmin(np.abs(best + 1 - len(rows) / 2))])
    return costs.call - float(saved[m]), m + 1


def balance_chunk_count(plan: ChunkPlan, count: int, lengths: list[int] | None = None,
                        costs: ChunkCosts | None = None) -> ChunkPlan:
    """Return a plan with exactly ``count`` chunks (``count >= len(plan)``); every chunk stays within the limits.

    With ``costs`` (and the sequences' ``lengths``), the split that adds the
    least modelled time is made, one at a time: a cut where the lengths drop
    can even pay for its extra call. Without, the chunk with the most rows is
    halved (the rule of :func:`plan_fill`'s plans). When no chunk has two
    rows left, dummy chunks holding the rank's first sequence are appended.
    """
    if count < len(plan):
        raise ValueError(f"cannot shrink a plan of {len(plan)} chunks to {count}")
    if costs is not None:
        return _split_cheapest(plan, count, np.asarray(lengths, dtype=np.int64), costs)
    chunks = list(plan.chunks)
    while len(chunks) < count:
        widest = max(range(len(chunks)), key=lambda c: len(chunks[c].indices))
        rows = chunks[widest].indices
        if len(rows) < 2:
            chunks.append(Chunk((chunks[0].indices[0],), dummy=True))
            continue
        half = (len(rows) + 1) // 2
        chunks[widest : widest + 1] = [Chunk(rows[:half]), Chunk(rows[half:])]
    return ChunkPlan(chunks)


def _split_cheapest(plan: ChunkPlan, count: int, lengths: np.ndarray, costs: ChunkCosts) -> ChunkPlan:
    """Cut the chunk whose best cut adds the least time until there are ``count`` chunks."""
    place = np.empty(len(lengths), dtype=np.int64)
    place[longest_first(lengths.tolist())] = np.arange(len(lengths))  # a sequence's place in the sorted order
    pieces = {int(place[c.indices[0]]): c.indices for c in plan.chunks}  # chunks by their first row's place
    heap = [(*best_split(rows, lengths, costs), key) for key, rows in pieces.items() if len(rows) > 1]
    heapq.heapify(heap)
    while len(pieces) < count and heap:
        _, cut, key = heapq.heappop(heap)
        rows = pieces[key]
        pieces[key], pieces[int(place[rows[cut]])] = rows[:cut], rows[cut:]
        for k in (key, int(place[rows[cut]])):
            if len(pieces[k]) > 1:
                heapq.heappush(heap, (*best_split(pieces[k], lengths, costs), k))
    chunks = [Chunk(pieces[k]) for k in sorted(pieces)]
    dummies = [Chunk((chunks[0].indices[0],), dummy=True)] * (count - len(chunks))
    return ChunkPlan(chunks + dummies)


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Torch's CPU generator (and ``device``'s, on a GPU) restored on exit: draws inside leave no trace."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        yield


def chunk_seed(seed: int, step: int, rank: int, chunk: int) -> int:
    """The RNG seed of one chunk's forward calls, the same in both passes.

    Seeding each chunk from (seed, step, rank, chunk) rather than carrying a
    captured generator state makes pass 2 draw exactly the dropout masks of
    pass 1, lets a reference implementation (or a resumed run) reproduce them,
    and leaves the global RNG stream untouched.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
