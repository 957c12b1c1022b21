"""Embedding the corpus and the queries over the ranks, in length-sorted batches that do not depend on the ranks.

The batches are sentence-transformers' ``encode`` batches: the whole list
sorted by character length, longest first (the same ``np.argsort``), cut
every ``batch_size`` texts. Batch b goes to rank ``b % world_size``. So a
text is embedded in the same batch, padded to the same length, however many
ranks there are, and on one process in the very batch ``encode`` would use:
its embedding does not change with the world size (on a CPU, bit for bit),
which is what lets the multi-rank search equal the single-process one.
(The training step's planner cuts by a token budget instead; that would
make a text's batch depend on which rank's share it fell in.)

Each rank tokenizes only its own batches' texts, with the model's own
tokenizer, from the raw strings (:func:`~ds_contrastive.core.shard.tokenize`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..core.shard import tokenize, tokenizer_settings
from ..errors import DataError


def length_sorted_batches(texts: list[str], batch_size: int) -> list[np.ndarray]:
    """Indices of ``texts`` in sentence-transformers' ``encode`` batches (longest first, same argsort)."""
    order = np.argsort([-len(t) for t in texts])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def rank_batches(batches: list[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """The batches rank ``rank`` embeds: every ``world_size``-th, starting at its own."""
    return batches[rank::world_size]


@torch.inference_mode()
def embed_share(model, texts: list[str], prompt: str, batch_size: int, rank: int, world_size: int,
                device: torch.device, progress: Callable[[int], None] = lambda n: None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, embeddings) of the texts this rank embeds: int64 (n,) and unit-length float32 (n, d) on the host.

    ``prompt`` is prepended to every text before tokenizing (after the
    length sort, as ``encode(prompt=...)`` does). The embeddings are
    normalized, as ``mine_hard_negatives`` asks ``encode`` for, so an inner
    product is a cosine similarity. ``progress(n)`` is told each batch's size.
    """
    batches = rank_batches(length_sorted_batches(texts, batch_size), rank, world_size)
    if not batches:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, 0)
    mine = np.concatenate(batches)
    max_length, lowercase = tokenizer_settings(model)
    model.eval()
    parts = []
    for batch in batches:  # tokenized one batch at a time: host memory does not grow with the share
        tokens = tokenize(model.tokenizer, [prompt + texts[i] for i in batch.tolist()], max_length, lowercase)
        embedding = model(tokens.features(range(len(batch)), device))["sentence_embedding"]
        parts.append(F.normalize(embedding.float(), p=2, dim=1).cpu())
        progress(len(batch))
    embeddings = torch.cat(parts)
    if not torch.isfinite(embeddings).all():
        bad = int(mine[int((~torch.isfinite(embeddings)).any(dim=1).nonzero()[0])])
        raise DataError(f"the model's embedding of text {bad} ({texts[bad][:80]!r}) is not finite")
    return torch.from_numpy(mine.astype(np.int64)), embeddings


def share_size(count: int, batch_size: int, rank: int, world_size: int) -> int:
    """How many of ``count`` texts rank ``rank`` embeds (for its progress bar), without sorting them."""
    batches = -(-count // batch_size)
    mine = range(rank, batches, world_size)
    last = count - (batches - 1) * batch_size
    return len(mine) * batch_size - (batch_size - last if batches - 1 in mine else 0)
