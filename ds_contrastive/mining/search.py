"""Exact top-k by inner product, in tiles, ranked the same way whatever the tiling or the number of ranks.

The ranking is documented and total: **higher score first, then the lower
corpus index**. Two things make it independent of how the corpus is split:

* a score is computed in float64 from the float32 embeddings and rounded to
  float32, so the same (query, document) pair gets the same score in any
  tile shape (a float32 matrix product may sum in another order for another
  shape, and a last-bit difference would reorder near-ties);
* score and index are packed into one int64 key (:func:`ranking_keys`),
  unique per document, so a plain ``topk`` of keys is exact: no tie is left
  for ``topk`` to break its own way.

Each rank keeps a running top-k of its corpus share (:func:`top_k`); the
ranks' lists are merged by the same ``topk`` of keys (:func:`merge`).
Device memory is one query block times one corpus tile, whatever the
corpus's size.
"""

from __future__ import annotations

import torch

LOW_BITS = 32
LOW_MASK = (1 << LOW_BITS) - 1
MAX_INDEX = LOW_MASK  # corpus indices must be < 2**32
PAD_KEY = torch.iinfo(torch.int64).min  # "no candidate": below every real key
SIGN_FREE = 0x7FFFFFFF


def ranking_keys(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One int64 per candidate that sorts as (score descending, index ascending); scores float32, finite.

    The high 32 bits hold the score's bits made monotone (a negative
    float's magnitude bits are flipped), the low 32 bits hold
    ``MAX_INDEX - index``, so the lower index of two equal scores has the
    larger key.
    """
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0, one key for zero
    monotone = torch.where(bits >= 0, bits, bits ^ SIGN_FREE)
    return monotone * (1 << LOW_BITS) + (MAX_INDEX - indices)


def decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32, indices int64) of ``keys``; a ``PAD_KEY`` gives score -inf and index -1."""
    monotone = keys >> LOW_BITS
    bits = torch.where(monotone >= 0, monotone, monotone ^ SIGN_FREE).to(torch.int32)
    scores = bits.view(torch.float32).clone()
    indices = MAX_INDEX - (keys & LOW_MASK)
    pad = keys == PAD_KEY
    scores[pad] = float("-inf")
    indices[pad] = -1
    return scores, indices


def exact_scores(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """Inner products summed in float64, rounded to float32: the same value in any tile shape, but for a float64
    sum landing within rounding of a float32 boundary (a product of two float32 numbers is exact in float64; only
    the sum's order differs with the kernel, some 2^-29 of a float32 step). On GPUs whose float64 is slow this
    search is too: ``--search faiss`` is the fast option there.
    """
    return (queries.double() @ documents.double().T).float()


def top_k(queries: torch.Tensor, corpus: torch.Tensor, corpus_indices: torch.Tensor, k: int,
          tile_rows: int) -> torch.Tensor:
    """Keys of the ``k`` best documents of ``corpus`` for each query, best first; ``PAD_KEY`` where fewer exist.

    ``queries`` (B, d) sit on the device the search runs on; ``corpus``
    (n, d) may stay on the host: one tile of ``tile_rows`` documents at a
    time is moved over. ``corpus_indices`` (n,) are the documents' global
    indices, which the keys carry.
    """
    device = queries.device
    best = torch.full((len(queries), k), PAD_KEY, dtype=torch.int64, device=device)
    queries = queries.double()
    for start in range(0, len(corpus), tile_rows):
        tile = corpus[start : start + tile_rows].to(device, non_blocking=True)
        keys = ranking_keys(exact_scores(queries, tile), corpus_indices[start : start + tile_rows].to(device)[None])
        best = merge([best, keys], k)
    return best


def merge(parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """The ``k`` largest keys of each row over ``parts`` (the ranks' or the tiles' lists), sorted descending."""
    keys = torch.cat(parts, dim=1)
    if keys.shape[1] < k:
        keys = torch.cat([keys, keys.new_full((len(keys), k - keys.shape[1]), PAD_KEY)], dim=1)
    return torch.topk(keys, k, dim=1).values


def faiss_top_k(corpus: torch.Tensor, corpus_indices: torch.Tensor, k: int):
    """A search function over this rank's share with faiss's exact flat inner-product index (``--search faiss``).

    Its scores are faiss's float32 sums, so unlike :func:`top_k` a near-tie
    may order differently with another split of the corpus; equal scores
    still rank by the lower index, but at the k-th place faiss may have kept
    another of them.
    """
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    if len(corpus):
        index.add(corpus.float().numpy())

    def search(queries: torch.Tensor) -> torch.Tensor:
        found = min(k, index.ntotal)
        if found == 0:
            return torch.full((len(queries), k), PAD_KEY, dtype=torch.int64, device=queries.device)
        scores, local = index.search(queries.float().cpu().numpy(), found)
        local = torch.from_numpy(local)
        keys = ranking_keys(torch.from_numpy(scores), corpus_indices[local.clamp(min=0)])
        keys[local < 0] = PAD_KEY
        return merge([keys.to(queries.device)], k)

    return search
