"""Batch and chunk sizes: the rows of an item (tiny in smoke mode), its warm-up rows, the engine's memory cap.

Every part warms up once on a smaller batch (kernels, the allocator) before its timed full-size
steps: an eighth of the batch, between 2,048 rows and the whole batch, and at most 4,096 rows for the
1,048,576-row batch (half the batch in smoke mode). The loss tile size is set here too, since it
sizes the logits the loss holds at once.
"""

from __future__ import annotations

import math

from .models import SHAPES

SMOKE_ROWS = {16384: 32, 65536: 64, 1048576: 512}


def scaled_rows(rows: int, smoke: bool) -> int:
    """The rows an item of ``rows`` nominal rows runs with (SMOKE_ROWS in smoke mode)."""
    return SMOKE_ROWS[rows] if smoke else rows


def warm_rows(rows: int, smoke: bool) -> int:
    return rows // 2 if smoke else min(rows, max(2048, rows // 8), 4096 if rows > 200_000 else rows)


def chunk_tokens_cap(shape: str, setting: str, smoke: bool, total_mem: int) -> int:
    """The engine's memory cap (most padded tokens per forward call): a quarter of the card's memory.

    A cap, not a target: the planner cuts smaller chunks wherever the measured time says so.
    ``setting`` is --chunk-tokens: "auto" or a number of tokens.
    """
    if setting != "auto":
        return int(setting)
    if smoke:
        return 1024
    s = SHAPES[shape]
    per_token = s["layers"] * s["hidden"] * 40  # activation bytes per padded token (bf16), for sizing only
    tokens = 0.25 * total_mem / per_token
    return int(min(262144, max(8192, 2 ** math.floor(math.log2(tokens)))))


def tile_elements(smoke: bool) -> int | None:
    return None if smoke else 1 << 28  # 1 GiB fp32 logits per loss tile (default is 1 << 25)
