"""Length-sorted chunk planning for the two encoder passes.

A chunk is the set of sequences the encoder sees in one forward call. Sorting
by length before cutting keeps padding near zero: every sequence in a chunk is
padded only to the longest one in that chunk. Every rank must run the same
number of forward calls per pass (under ZeRO-3 each forward gathers parameters
collectively), so after planning, ranks agree on the largest chunk count and
the others split chunks (or add dummy chunks) to reach it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


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


def plan_chunks(lengths: list[int], token_budget: int | None, max_rows: int | None) -> ChunkPlan:
    """Cut sequences into chunks of at most ``token_budget`` padded tokens.

    Sequences are sorted longest first (stable, so ties keep their input
    order); a chunk grows while ``rows * longest <= token_budget`` and
    ``rows <= max_rows``. The first chunk therefore holds the longest
    sequences, so a budget that does not fit in memory fails on the first
    forward call rather than midway. A sequence longer than the budget gets a
    chunk of its own.
    """
    if token_budget is None and max_rows is None:
        raise ValueError("chunking needs a token budget (chunk_tokens), a row limit (chunk_rows), or both")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"the chunk token budget (chunk_tokens) must be >= 1, got {token_budget}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"the chunk row limit (chunk_rows) must be >= 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[Chunk] = []
    current: list[int] = []
    for i in order:
        rows = len(current) + 1
        longest = lengths[current[0]] if current else lengths[i]
        over_budget = token_budget is not None and rows * longest > token_budget
        over_rows = max_rows is not None and rows > max_rows
        if current and (over_budget or over_rows):
            chunks.append(Chunk(tuple(current)))
            current = []
        current.append(i)
    if current:
        chunks.append(Chunk(tuple(current)))
    return ChunkPlan(chunks)


def balance_chunk_count(plan: ChunkPlan, count: int) -> ChunkPlan:
    """Return a plan with exactly ``count`` chunks (``count >= len(plan)``).

    The chunk with the most rows is halved until the count is reached, which
    keeps every chunk under the original budget; when no chunk has two rows
    left, dummy chunks holding the rank's first sequence are appended.
    """
    if count < len(plan):
        raise ValueError(f"cannot shrink a plan of {len(plan)} chunks to {count}")
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


def chunk_seed(seed: int, step: int, rank: int, chunk: int) -> int:
    """The RNG seed of one chunk's forward calls, the same in both passes.

    Seeding each chunk from (seed, step, rank, chunk) rather than carrying a
    captured generator state makes pass 2 draw exactly the dropout masks of
    pass 1, lets a reference implementation (or a resumed run) reproduce them,
    and leaves the global RNG stream untouched.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
