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

from .blockwise import Term
from .guide_model import Guide
from .infonce import InfoNCE, LossResult, Sides


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

    def summarize(self, sums: dict[str, float], n: int) -> dict[str, float]:
        metrics = super().summarize(sums, n)
        for term in self.term_names():
            metrics[f"guide_masked_fraction_{term}"] = sums[f"masked_{term}"] / max(1.0, sums[f"candidates_{term}"])
            metrics[f"guide_masked_similarity_{term}"] = (
                sums[f"masked_similarity_{term}"] / sums[f"masked_{term}"] if sums[f"masked_{term}"] else 0.0
            )
        return metrics

    def term_names(self) -> list[str]:
        return ["anchor_doc"] + ["anchor_anchor"] * self.contrast_anchors + ["positive_positive"] * self.contrast_positives

    def terms(self, sides: Sides) -> tuple[list[Term], torch.Tensor | None]:
        """Anchor-document, anchor-anchor and positive-positive candidates, each masked by the guide above the row's
        threshold (the positive itself never) and by duplicates."""
        if sides.guide_queries is None:
            raise ValueError("GuidedInfoNCE needs the guide embeddings of the global batch")
        q, d, gq, gd = sides.queries, sides.docs, sides.grad_queries, sides.grad_docs
        guide_q, guide_d = sides.guide_queries, sides.guide_docs
        n = len(q)
        threshold = (guide_q * guide_d[:n]).sum(-1)
        threshold = threshold - (threshold.abs() * self.margin if self.margin_strategy == "relative" else self.margin)
        terms = [Term("anchor_doc", q, d, gq, gd, *sides.duplicates("doc"), guide_q, guide_d, protect_positive=True)]
        if self.contrast_anchors:
            terms.append(Term("anchor_anchor", q, q, gq, gq, *sides.duplicates("query"), guide_q, guide_q))
        if self.contrast_positives:
            terms.append(Term("positive_positive", d[:n], d[:n], gd[:n], gd[:n], *sides.duplicates("doc", n),
                              guide_d[:n], guide_d[:n]))
        return terms, threshold
