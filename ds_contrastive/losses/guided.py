"""Guided (GIST-style) InfoNCE: a frozen guide model, or the student itself, masks in-batch false negatives.

Large global batches hold many false negatives: other rows whose positive also
answers this anchor. For anchor i, the guide's cosine similarity of
(anchor_i, positive_i) sets a threshold; any candidate the guide finds more
similar to the row than that threshold minus a margin is not a negative. The
anchor-anchor and positive-positive terms run over the *global* gathered
anchors and positives, unlike implementations that gather candidates but keep
anchors local.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .guide_model import Guide
from .infonce import GlobalColumns, InfoNCE, LossResult, negative_sums


@dataclass
class GuidedInfoNCE(InfoNCE):
    """InfoNCE whose negatives are filtered by a frozen guide model.

    For row i the logits are ``scale * sim`` of

    * anchor_i against every positive and hard negative of the global batch,
    * with ``contrast_anchors``: anchor_i against every global anchor,
    * with ``contrast_positives``: positive_i against every global positive,

    one softmax over all of them, target positive_i. A candidate c is masked
    when ``g(row, c) > g(a_i, p_i) - margin`` (``margin_strategy="absolute"``)
    or ``> g(a_i, p_i) - |g(a_i, p_i)| * margin`` (``"relative"``), where g
    is the guide's cosine similarity and ``row`` is a_i, or p_i in the
    positive-positive term. The true positive is never masked. Duplicate
    masking of :class:`InfoNCE` still applies. This is sentence-transformers'
    GISTEmbedLoss, with any number of hard-negative columns and exact across
    ranks.

    ``guide="self"``: g is the student's own cosine similarity, from this
    step's pass-1 embeddings of the global batch (detached): no second model
    and no extra forward. A negative margin masks only candidates the model
    scores above the positive by that much: ``margin=-0.1`` is
    Qwen3-Embedding's false-negative mask (a candidate more similar than
    sim(a_i, p_i) + 0.1 is not a negative).

    Args:
        guide: a ``SentenceTransformer``, a path to one, a :class:`Guide`, or
            ``"self"``.
        guide_chunk_tokens: padded-token budget of one guide forward call.
    """

    guide: object = None
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    guide_chunk_tokens: int = 16384
    temperature: float = 0.01
    guide_model: Guide | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.directions != ("query_to_doc",):
            raise ValueError(
                "GuidedInfoNCE takes its extra terms from contrast_anchors / contrast_positives; "
                f"directions must be ('query_to_doc',), got {self.directions}"
            )
        if self.partition != "joint":
            raise ValueError("GuidedInfoNCE needs partition='joint': its anchor-anchor and positive-positive "
                             "candidate pools never hold the positive")
        if self.margin_strategy not in ("absolute", "relative"):
            raise ValueError(f"margin_strategy must be 'absolute' or 'relative', got {self.margin_strategy!r}")
        if self.guide is None:
            raise ValueError("GuidedInfoNCE needs a guide: a SentenceTransformer, a path, or 'self'")
        if not self.self_guided:
            self.guide_model = (self.guide if isinstance(self.guide, Guide)
                                else Guide(self.guide, self.guide_chunk_tokens))

    @property
    def self_guided(self) -> bool:
        """Whether the student's own embeddings guide the masks."""
        return isinstance(self.guide, str) and self.guide == "self"

    def compute(self, embeddings: torch.Tensor, hashes: torch.Tensor, first_row: int, rows: int, scale: float,
                guide: torch.Tensor | None = None) -> LossResult:
        """:meth:`InfoNCE.compute`; self-guided, the guide is ``embeddings`` themselves (detached)."""
        if self.self_guided and guide is None:
            guide = embeddings.detach()
        return super().compute(embeddings, hashes, first_row, rows, scale, guide)

    def candidates_per_row(self, n: int, docs: int) -> int:
        return docs + n * (self.contrast_anchors + self.contrast_positives)

    def summarize(self, sums: dict[str, float], n: int) -> dict[str, float]:
        metrics = super().summarize(sums, n)
        for term in self.terms():
            metrics[f"guide_masked_fraction_{term}"] = sums[f"masked_{term}"] / max(1.0, sums[f"candidates_{term}"])
            metrics[f"guide_masked_similarity_{term}"] = (
                sums[f"masked_similarity_{term}"] / sums[f"masked_{term}"] if sums[f"masked_{term}"] else 0.0
            )
        return metrics

    def terms(self) -> list[str]:
        return ["anchor_doc"] + ["anchor_anchor"] * self.contrast_anchors + ["positive_positive"] * self.contrast_positives

    def _rows(
        self, cols: GlobalColumns, idx: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if cols.guide_queries is None:
            raise ValueError("GuidedInfoNCE needs the guide embeddings of the global batch")
        n, queries, docs = cols.n, cols.queries, cols.docs
        positives, guide_positives = docs[:n], cols.guide_docs[:n]
        rows = torch.arange(len(idx), device=docs.device)
        guide_q, guide_p = cols.guide_queries[idx], cols.guide_docs[idx]
        threshold = (guide_q * guide_p).sum(-1, keepdim=True)
        threshold = threshold - (threshold.abs() * self.margin if self.margin_strategy == "relative" else self.margin)

        dup_docs = self.duplicates(cols.doc_hash, cols.doc_hash[idx], idx)
        is_positive = torch.zeros_like(dup_docs)
        is_positive[rows, idx] = True
        plan = [("anchor_doc", queries[idx], docs, guide_q @ cols.guide_docs.T, dup_docs, is_positive)]
        if self.contrast_anchors:
            dup_queries = self.duplicates(cols.query_hash, cols.query_hash[idx], idx)
            plan.append(("anchor_anchor", queries[idx], queries, guide_q @ cols.guide_queries.T, dup_queries, None))
        if self.contrast_positives:
            plan.append(("positive_positive", docs[idx], positives, guide_p @ guide_positives.T,
                         dup_docs[:, :n], None))

        terms, sums = [], {}
        for name, row_emb, candidates, guide_sim, duplicate, protected in plan:
            masked = guide_sim > threshold
            if protected is not None:
                masked &= ~protected
            terms.append((scale * row_emb @ candidates.T).masked_fill(masked | duplicate, -torch.inf))
            sums[f"masked_{name}"] = masked.sum()
            sums[f"candidates_{name}"] = torch.tensor(masked.numel(), device=docs.device)
            sums[f"masked_similarity_{name}"] = (guide_sim * masked).sum()
        positive = terms[0][rows, idx]
        sums["masked_duplicates"] = dup_docs.sum()
        sums.update(negative_sums(terms, idx, scale))
        return self.log_partition(terms) - positive, sums
