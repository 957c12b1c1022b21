"""Retrieval metrics for held-out (query, document) pairs.

A contrastive loss going down says the model separates in-batch negatives;
whether it actually retrieves is measured here: every held-out query is scored
against every held-out document, and query i's only relevant document is
document i (the setting of ``stdlib_pairs``, where each summary has exactly one
docstring body). Scores are cosine similarities, computed a block of queries
at a time so memory stays O(block x N) however many pairs are evaluated.

Ties are resolved pessimistically: a document scoring exactly the same as the
relevant one counts as ranked ahead of it. A collapsed model that maps every
text to the same vector therefore gets rank N, not rank 1, so degenerate
embeddings cannot score well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from ..core.collectives import gather_rows, sum_scalars
from ..core.runtime import world

CUTOFF = 10  # the depth of mrr@10 and ndcg@10


class Encoder(Protocol):
    """What ``evaluate_model`` needs of a model; ``SentenceTransformer`` satisfies it."""

    def encode(self, sentences: list[str], **kwargs) -> torch.Tensor: ...


def retrieval_metrics(
    query_emb: torch.Tensor, doc_emb: torch.Tensor, ks: Sequence[int] = (1, 10), block_size: int = 1024
) -> dict[str, float]:
    """``recall@k`` for each k in ``ks``, ``mrr@10`` and ``ndcg@10``, averaged over queries.

    Row i of ``query_emb`` is relevant to row i of ``doc_emb`` only. With a
    single relevant document, nDCG@10 is ``1 / log2(rank + 1)`` when
    rank <= 10 and 0 otherwise (rank is 1-based, ties pessimistic).
    """
    if query_emb.shape != doc_emb.shape:
        raise ValueError(f"need as many queries as documents, got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}")
    ranks = relevant_ranks(query_emb, doc_emb, block_size)
    return metrics_from_ranks(ranks, ks)


def sharded_retrieval_metrics(query_emb: torch.Tensor, doc_emb: torch.Tensor, counts: list[int],
                              ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """:func:`retrieval_metrics` of held-out pairs split over ranks; collective, equal on every rank.

    Each rank holds the embeddings of its own ``counts[rank]`` pairs (in rank
    order they make the whole set). Documents are gathered so that every
    query is ranked against all of them; each rank ranks its own queries and
    the per-query sums are added over ranks. Memory per rank: all documents,
    plus one block of scores.
    """
    rank = world()[0]
    docs = gather_rows(doc_emb.contiguous(), counts)
    sums = metric_sums(relevant_ranks(query_emb, docs, first=sum(counts[:rank])), ks)
    totals = sum_scalars(list(sums.values()), doc_emb.device)
    return {key: total / sum(counts) for key, total in zip(sums, totals)}


def relevant_ranks(query_emb: torch.Tensor, doc_emb: torch.Tensor, block_size: int = 1024, first: int = 0
                   ) -> torch.Tensor:
    """The 1-based rank of document ``first + i`` among all documents for query i, ties counted against it."""
    if query_emb.ndim != 2 or doc_emb.ndim != 2 or query_emb.shape[1] != doc_emb.shape[1] or (
            first + len(query_emb) > len(doc_emb)):
        raise ValueError(f"need [n, dim] queries for documents {first}..{first + len(query_emb) - 1} of [N, dim] "
                         f"documents, got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    queries = F.normalize(query_emb.float(), dim=-1)
    docs = F.normalize(doc_emb.float(), dim=-1)
    blocks = [_block_ranks(queries[start : start + block_size], docs, first + start)
              for start in range(0, len(queries), block_size)]
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Average recall@k, MRR@10 and nDCG@10 over queries whose relevant document has rank ``ranks``."""
    if ranks.numel() == 0:
        raise ValueError("no queries to evaluate")
    return {key: total / ranks.numel() for key, total in metric_sums(ranks, ks).items()}


def metric_sums(ranks: torch.Tensor, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Sums over queries of recall@k, reciprocal rank within 10 and nDCG@10 (add these over shards, then divide)."""
    ranks = ranks.double()
    within = ranks <= CUTOFF
    sums = {f"recall@{k}": (ranks <= k).double().sum().item() for k in ks}
    sums[f"mrr@{CUTOFF}"] = torch.where(within, 1.0 / ranks, 0.0).sum().item()
    sums[f"ndcg@{CUTOFF}"] = torch.where(within, math.log(2) / torch.log(ranks + 1), 0.0).sum().item()
    return sums


def evaluate_model(model: Encoder, queries: list[str], docs: list[str], batch_size: int = 64) -> dict[str, float]:
    """Embed ``queries`` and ``docs`` with ``model`` and score retrieval of docs[i] for queries[i]."""
    if len(queries) != len(docs):
        raise ValueError(f"{len(queries)} queries but {len(docs)} documents")
    query_emb = _encode(model, queries, batch_size)
    doc_emb = _encode(model, docs, batch_size)
    return retrieval_metrics(query_emb, doc_emb)


def _block_ranks(queries: torch.Tensor, docs: torch.Tensor, start: int) -> torch.Tensor:
    """Ranks for a block of queries whose relevant documents are ``start .. start + len(queries) - 1``."""
    scores = queries @ docs.T
    rows = torch.arange(len(queries), device=scores.device)
    relevant = scores[rows, rows + start].unsqueeze(1)
    return (scores >= relevant).sum(dim=1).cpu()  # counts the relevant document itself, so rank >= 1


def _encode(model: Encoder, texts: list[str], batch_size: int) -> torch.Tensor:
    """Embeddings of ``texts`` as one [N, dim] tensor."""
    return model.encode(texts, convert_to_tensor=True, batch_size=batch_size, show_progress_bar=False)
