"""Contrastive losses over a gathered global batch, computed in row tiles.

The engine hands a loss the detached embeddings of the *global* batch
(every rank's rows, in rank order). The loss computes the rows of this rank's
anchors against every global candidate, a tile of rows against a block of
candidates at a time (:mod:`~ds_contrastive.losses.blockwise`), so memory is
one tile x block of logits whatever N, and its cost is its matrix products. It returns the gradient of
``(1 / N) * sum over this rank's rows of loss_i`` with respect to every
global embedding; the engine sums those over ranks, which gives each rank the
gradient of the global mean loss with respect to its own embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import PRECISIONS, Core, Term, equal_pairs, union_pairs

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
class Sides:
    """The global batch in the similarity space: queries (anchors) and documents, with their gradient buffers.

    ``docs`` holds every positive, then every first hard negative, and so on
    (row i's positive is docs[i]); ``*_hash`` their texts' hashes.
    ``guide_*``: the guide's normalized embeddings, same layout.
    """

    queries: torch.Tensor
    docs: torch.Tensor
    grad_queries: torch.Tensor
    grad_docs: torch.Tensor
    query_hash: torch.Tensor
    doc_hash: torch.Tensor
    mask_duplicates: bool
    guide_queries: torch.Tensor | None = None
    guide_docs: torch.Tensor | None = None

    def duplicates(self, of: str, width: int | None = None
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """Candidates whose text equals row i's anchor (``of="query"``, among the queries) or positive (``"doc"``,
        among the first ``width`` documents), other than candidate i: as listed (row, candidate) pairs, or, when
        there are too many to list, as the hashes to compare per block (second item)."""
        hashes = self.query_hash if of == "query" else self.doc_hash[:width]
        rows = hashes[:len(self.queries)]
        empty = torch.zeros(0, dtype=torch.long, device=hashes.device)
        if not self.mask_duplicates:
            return (empty, empty), None
        pairs = equal_pairs(rows, hashes, skip_own=True)
        return ((empty, empty), (rows, hashes)) if pairs is None else (pairs, None)


def by_column(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, C, d] -> one contiguous [C, N, d] copy (unit rows if ``normalize``), and the norms it was divided by.

    Column-major, so that the queries (column 0) and the documents (every
    positive, then every first hard negative, ...) are views of it.
    """
    x = torch.empty((x.shape[1], x.shape[0], x.shape[2]), device=x.device).copy_(x.transpose(0, 1))  # never x itself
    if not normalize:
        return x, None
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
    return x.div_(norms), norms


def split_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, N, d] -> (column 0 as [N, d], columns 1.. stacked column after column as [(C-1)N, d]), views."""
    return x[0], x[1:].reshape(-1, x.shape[-1])


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

    ``tile_elements``: the most logits held at once (a tile of rows x a block
    of candidates; 2**25, 128 MiB); ``tile_rows`` fixes the tile height.
    ``precision``: the matrix products' inputs, ``"fp32"`` (default),
    ``"tf32"`` (CUDA's TF32; a CPU computes fp32) or ``"bf16"`` (inputs rounded
    to bf16, fp32 accumulation, fp32 log-sum-exp): with cosine similarity each
    logit is within ``scale x 2**-8`` of fp32's, so each row's loss within twice
    that (tests/unit/test_blockwise.py measures it).
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
    precision: str = "fp32"

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
        if self.tile_elements < 1:
            raise ValueError(f"tile_elements must be >= 1, got {self.tile_elements}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

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
        The logits, their masks, log-sum-exp and gradient run blockwise
        (:mod:`~ds_contrastive.losses.blockwise`), the normalization's in closed
        form: no autograd graph, and three N x C x d buffers (the unit
        embeddings, their gradient and the gradient returned).
        """
        n = embeddings.shape[0]
        cosine = self.similarity == "cosine"
        space, norms = by_column(embeddings.detach(), cosine)
        grad = torch.zeros_like(space)
        query_hash, doc_hash = hashes[:, 0], hashes[:, 1:].transpose(0, 1).reshape(-1)
        sides = Sides(*split_columns(space), *split_columns(grad), query_hash, doc_hash, self.mask_duplicates)
        if guide is not None:
            sides.guide_queries, sides.guide_docs = split_columns(by_column(guide.detach(), True)[0])
        terms, thresholds = self.terms(sides)
        core = Core(terms, n, scale, self.partition == "joint", self.tile_rows, self.tile_elements, self.precision,
                    thresholds)
        grad_scale, sums = core.run(first_row, rows)
        if cosine:  # through the normalization, in closed form: (g - (g . u) u) / |x|
            grad.addcmul_(space, torch.linalg.vecdot(grad, space).unsqueeze(-1), value=-1).div_(norms)
        return LossResult(grad.transpose(0, 1).contiguous(), grad_scale, sums)

    def terms(self, sides: Sides) -> tuple[list[Term], torch.Tensor | None]:
        """Each direction's candidates of every row, with its masked pairs (duplicates, the row's own)."""
        q, d, gq, gd = sides.queries, sides.docs, sides.grad_queries, sides.grad_docs
        n, width = len(q), len(d)
        rows = torch.arange(n, device=q.device)
        same_doc, same_query = sides.duplicates("doc"), sides.duplicates("query")
        terms = [Term("query_to_doc", q, d, gq, gd, *same_doc)]
        if "query_to_query" in self.directions:  # never the anchor itself
            own = union_pairs((rows, rows), same_query[0], cols=n)
            terms.append(Term("query_to_query", q, q, gq, gq, own, same_query[1]))
        if "doc_to_query" in self.directions:
            terms.append(Term("doc_to_query", d[:n], q, gd[:n], gq, *same_query))
        if "doc_to_doc" in self.directions:  # never the row's own documents (its positive and hard negatives)
            own = union_pairs((rows.repeat(width // n), torch.arange(width, device=q.device)), same_doc[0], cols=width)
            terms.append(Term("doc_to_doc", d[:n], d, gd[:n], gd, own, same_doc[1]))
        return terms, None

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
