"""Contrastive losses over a gathered global batch, computed in row tiles.

The engine hands a loss the detached embeddings of the *global* batch
(every rank's rows, in rank order). The loss computes the rows of this rank's
anchors against every global candidate, a tile of rows at a time, so memory is
O(tile x N) and never O(N^2). It returns the gradient of
``(1 / N) * sum over this rank's rows of loss_i`` with respect to every
global embedding; the engine sums those over ranks, which gives each rank the
gradient of the global mean loss with respect to its own embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


@dataclass
class LossResult:
    """What the loss stage of one rank produces.

    ``grad`` has the shape of the global embeddings; ``grad_scale`` is the
    derivative with respect to the logit scale (1 / temperature); ``sums``
    are sums over this rank's rows only (loss, correct top-1, masked
    candidates, ...), which the engine adds up over ranks and hands to the
    loss's ``summarize``.
    """

    grad: torch.Tensor
    grad_scale: float
    sums: dict[str, float]


@dataclass
class GlobalColumns:
    """The global batch in the similarity space, split into query and document candidates.

    ``docs`` holds every positive, then every first hard negative, and so on
    (row i's positive is docs[i]). The ``guide_*`` tensors are the guide
    model's normalized embeddings in the same layout (guided losses only).
    """

    queries: torch.Tensor
    docs: torch.Tensor
    query_hash: torch.Tensor
    doc_hash: torch.Tensor
    guide_queries: torch.Tensor | None = None
    guide_docs: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.queries.shape[0]


def split_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C, ...] -> (column 0 as [N, ...], columns 1.. stacked column after column as [(C-1)N, ...])."""
    return x[:, 0], x[:, 1:].transpose(0, 1).reshape(-1, *x.shape[2:])


@dataclass
class InfoNCE:
    """InfoNCE / multiple-negatives ranking loss with in-batch and hard negatives.

    For anchor i with positive p_i and hard negatives n_i1..n_ik, the
    ``query_to_doc`` term is a softmax of ``scale * sim(a_i, .)`` over every
    positive and hard negative in the global batch, target p_i. The other
    directions (as in GTE's improved contrastive loss, and in
    sentence-transformers' ``MultipleNegativesRankingLoss(directions=...)``)
    add candidates to the partition function of row i:
    ``query_to_query`` sim(a_i, a_j), j != i; ``doc_to_query`` sim(p_i, a_j);
    ``doc_to_doc`` sim(p_i, d) for every document d not belonging to row i.
    The numerator is always sim(a_i, p_i). ``partition="joint"`` takes one
    log-sum-exp over all selected terms, ``"per_direction"`` the mean of one
    per term.

    Duplicate masking (``mask_duplicates``): a document candidate whose text
    equals the row's positive, or a query candidate whose text equals the row's
    anchor, is not a negative, wherever it sits in the global batch.

    ``temperature`` is 1 / scale. With ``learnable_temperature`` the engine
    trains log(scale); the scale is clamped in the forward pass so that
    temperature >= ``min_temperature``, and at that bound its gradient is zero
    (the temperature stays there unless the clamp is lowered).
    """

    temperature: float = 0.05
    learnable_temperature: bool = False
    min_temperature: float = 0.01
    directions: tuple[str, ...] = ("query_to_doc",)
    partition: str = "joint"
    similarity: str = "cosine"
    mask_duplicates: bool = True
    tile_rows: int | None = None
    tile_elements: int = 1 << 25

    def __post_init__(self) -> None:
        self.directions = tuple(self.directions)
        unknown = [d for d in self.directions if d not in DIRECTIONS]
        if unknown or not self.directions:
            raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {self.directions}")
        if "query_to_doc" not in self.directions:
            raise ValueError("directions must include 'query_to_doc' (it holds the positive pair)")
        if self.partition not in ("joint", "per_direction"):
            raise ValueError(f"partition must be 'joint' or 'per_direction', got {self.partition!r}")
        if self.partition == "per_direction" and {"query_to_query", "doc_to_doc"} & set(self.directions):
            raise ValueError(
                "partition='per_direction' cannot take 'query_to_query' or 'doc_to_doc': their candidate pools "
                "never hold the positive, so their per-direction loss is unbounded below; use partition='joint'"
            )
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if not 0 < self.min_temperature <= self.temperature:
            raise ValueError(
                f"need 0 < min_temperature <= temperature, got {self.min_temperature} and {self.temperature}"
            )
        if self.learnable_temperature and self.temperature <= self.min_temperature:
            raise ValueError(
                f"a learnable temperature that starts at min_temperature ({self.min_temperature}) cannot move: "
                "the clamp has zero gradient there; set min_temperature below temperature"
            )
        if self.tile_rows is not None and self.tile_rows < 1:
            raise ValueError(f"tile_rows must be >= 1, got {self.tile_rows}")

    @property
    def max_scale(self) -> float:
        return 1.0 / self.min_temperature

    def initial_log_scale(self) -> float:
        return math.log(1.0 / self.temperature)

    def compute(
        self,
        embeddings: torch.Tensor,
        hashes: torch.Tensor,
        first_row: int,
        rows: int,
        scale: float,
        guide: torch.Tensor | None = None,
    ) -> LossResult:
        """Loss rows ``first_row .. first_row + rows`` of the global batch, and their gradients.

        ``embeddings`` is [N, C, d]: column 0 anchors, 1 positives, 2.. hard
        negatives; ``hashes`` is [N, C], the texts' content hashes; ``guide``
        is [N, C, d_guide], the guide model's embeddings (guided losses only).
        """
        n, columns, dim = embeddings.shape
        raw = embeddings.detach().float().requires_grad_()
        space = F.normalize(raw, dim=-1) if self.similarity == "cosine" else raw
        # Leaves in the similarity space, so that each tile's graph stops here.
        queries, docs = (t.detach().requires_grad_() for t in split_columns(space))
        cols = GlobalColumns(queries, docs, *split_columns(hashes))
        if guide is not None:
            cols.guide_queries, cols.guide_docs = split_columns(F.normalize(guide.float(), dim=-1))
        s = torch.tensor(scale, dtype=torch.float32, device=raw.device, requires_grad=True)

        tile = self.tile_rows or max(1, self.tile_elements // self.candidates_per_row(n, docs.shape[0]))
        sums: dict[str, torch.Tensor] = {}
        for start in range(first_row, first_row + rows, tile):
            idx = torch.arange(start, min(start + tile, first_row + rows), device=raw.device)
            losses, tile_sums = self._rows(cols, idx, s)
            (losses.sum() / n).backward()
            tile_sums["loss"] = losses.detach().sum()
            for key, value in tile_sums.items():
                sums[key] = sums.get(key, 0) + value

        grad_space = torch.empty_like(space)
        grad_space[:, 0] = queries.grad
        grad_space[:, 1:] = docs.grad.reshape(columns - 1, n, dim).transpose(0, 1)
        space.backward(grad_space)
        return LossResult(raw.grad, s.grad.item(), {k: float(v) for k, v in sums.items()})

    def summarize(self, sums: dict[str, float], n: int) -> dict[str, float]:
        """Metrics of the global batch from the sums over every rank's rows.

        ``hardest_negative_similarity`` is the mean over anchors that have at
        least one unmasked document negative (NaN when none has).
        """
        with_negative = sums["rows_with_negatives"]
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n,
                "masked_duplicates": sums["masked_duplicates"], "candidates_per_anchor": sums["candidates"] / n,
                "positive_similarity": sums["positive_similarity"] / n,
                "hardest_negative_similarity": sums["hardest_negative_similarity"] / with_negative
                if with_negative else math.nan}

    def candidates_per_row(self, n: int, docs: int) -> int:
        """Columns of one row's logits (sets the tile height)."""
        return docs * (1 + ("doc_to_doc" in self.directions)) + n * (
            ("query_to_query" in self.directions) + ("doc_to_query" in self.directions)
        )

    def duplicates(self, col_hash: torch.Tensor, row_hash: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[rows, cols] True where a candidate other than column idx has the row's text."""
        if not self.mask_duplicates:
            return torch.zeros((len(idx), len(col_hash)), dtype=torch.bool, device=col_hash.device)
        col = torch.arange(len(col_hash), device=col_hash.device)
        return (col_hash[None, :] == row_hash[:, None]) & (col[None, :] != idx[:, None])

    def log_partition(self, terms: list[torch.Tensor]) -> torch.Tensor:
        if self.partition == "joint":
            return torch.logsumexp(torch.cat(terms, dim=1), dim=1)
        return torch.stack([torch.logsumexp(t, dim=1) for t in terms]).mean(0)

    def _rows(
        self, cols: GlobalColumns, idx: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-row losses of the global rows ``idx`` (one tile), and the tile's metric sums."""
        n, queries, docs = cols.n, cols.queries, cols.docs
        q, p = queries[idx], docs[idx]
        dup_docs = self.duplicates(cols.doc_hash, cols.doc_hash[idx], idx)
        dup_queries = self.duplicates(cols.query_hash, cols.query_hash[idx], idx)
        query_to_doc = (scale * q @ docs.T).masked_fill(dup_docs, -torch.inf)
        terms = [query_to_doc]
        if "query_to_query" in self.directions:
            own = torch.arange(n, device=docs.device)[None, :] == idx[:, None]
            terms.append((scale * q @ queries.T).masked_fill(own | dup_queries, -torch.inf))
        if "doc_to_query" in self.directions:
            terms.append((scale * p @ queries.T).masked_fill(dup_queries, -torch.inf))
        if "doc_to_doc" in self.directions:
            own = (torch.arange(docs.shape[0], device=docs.device)[None, :] % n) == idx[:, None]
            terms.append((scale * p @ docs.T).masked_fill(own | dup_docs, -torch.inf))
        positive = query_to_doc[torch.arange(len(idx), device=docs.device), idx]
        sums = {"masked_duplicates": dup_docs.sum(), **negative_sums(terms, idx, scale)}
        return self.log_partition(terms) - positive, sums


@torch.no_grad()
def negative_sums(terms: list[torch.Tensor], idx: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a tile's rows see of their negatives, as sums over the rows (for the ``negatives/`` metrics).

    ``terms`` are the row's scaled logits, masked candidates at -inf, the first
    being anchor-to-document with the positive at column ``idx``. Returns top-1
    ``correct``, the unmasked ``candidates`` besides the positive, and the
    unscaled similarity of the positive and of the hardest (most similar)
    unmasked document negative, with the count of rows that have one.
    """
    rows = torch.arange(len(idx), device=idx.device)
    query_to_doc = terms[0]
    top = query_to_doc.topk(min(2, query_to_doc.shape[1]), dim=1)
    # the best candidate other than the positive: the first of the top two that is not the positive
    hardest = torch.where(top.indices[:, 0] == idx, top.values[:, -1], top.values[:, 0])
    hardest = torch.where(top.indices[:, -1] == top.indices[:, 0], -torch.inf, hardest)  # one column: no negative
    has_negative = torch.isfinite(hardest)
    return {
        "correct": (query_to_doc.argmax(dim=1) == idx).sum(),
        "candidates": sum(torch.isfinite(t).sum() for t in terms) - len(idx),
        "positive_similarity": (query_to_doc[rows, idx] / scale).sum(),
        "hardest_negative_similarity": (hardest[has_negative] / scale).sum(),
        "rows_with_negatives": has_negative.sum(),
    }
