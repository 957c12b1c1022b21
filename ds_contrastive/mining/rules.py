"""Which ranked candidates become hard negatives: sentence-transformers' ``mine_hard_negatives`` rules.

Same option names, defaults and meaning as
``sentence_transformers.util.mine_hard_negatives``, so its users' settings
carry over. Applied to each query's ``range_max + max_positives`` best
candidates (the search's ranking: higher score first, then lower corpus
index), in this order:

1. the query's positives (every positive of every row with this anchor
   text; the corpus is deduplicated, so a text identical to a positive is
   the positive) are removed;
2. ``absolute_margin``: removed when ``score + absolute_margin >`` the
   query's least positive score; ``relative_margin``: removed when
   ``score >`` that score minus ``|that score| * relative_margin``
   (0.05 is NV-Retriever's TopK-PercPos 95%); ``max_score``: removed when
   ``score > max_score``; ``min_score``: removed when ``score < min_score``;
3. the remaining candidates keep their order; the first ``range_max`` of
   them are the window, less its first ``range_min``;
4. ``sampling_strategy="top"`` takes the window's first ``num_negatives``;
   ``"random"`` draws ``num_negatives`` positions among the window's
   remaining candidates (``random.Random(seed).sample``, one call per query
   in query order: sentence-transformers' calls on its global ``random``),
   then sorts them best first;
5. a query left with fewer than ``num_negatives`` negatives gets none: its
   rows are dropped from the output, as in the n-tuple format.

Functions here are pure: tensors in, tensors out, no collectives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import ConfigError

SAMPLING_STRATEGIES = ("top", "random")
NEG_INF = float("-inf")


@dataclass(frozen=True)
class SelectionRules:
    """The selection options, as sentence-transformers names them (``range_max=None``: derived, as there)."""

    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling_strategy: str = "top"

    def window_end(self, max_positives: int) -> int:
        """``range_max``, or sentence-transformers' default for it: room for skipped candidates when a rule skips."""
        if self.range_max is not None:
            return self.range_max
        filtered = any(v is not None for v in (self.absolute_margin, self.relative_margin, self.max_score))
        return self.range_min + self.num_negatives * (10 if filtered else 1) + max_positives

    def check(self, max_positives: int) -> None:
        """Refuse what sentence-transformers refuses, with its reasons (ConfigError)."""
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise ConfigError(f"sampling_strategy must be one of {SAMPLING_STRATEGIES}, got {self.sampling_strategy!r}")
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives must be at least 1, got num_negatives={self.num_negatives}")
        end = self.window_end(max_positives)
        if self.range_min < 0:
            raise ConfigError(f"range_min must be non-negative, got range_min={self.range_min}")
        if self.range_min >= end:
            raise ConfigError(f"range_min must be smaller than range_max, got range_min={self.range_min} and "
                              f"range_max={end}")
        if self.num_negatives > end - self.range_min:
            raise ConfigError(f"cannot mine {self.num_negatives} negatives per query: only {end - self.range_min} "
                              f"candidates remain after skipping the first range_min={self.range_min} of "
                              f"range_max={end}; decrease num_negatives or range_min, or increase range_max")

    def candidates(self, max_positives: int) -> int:
        """How many ranked candidates each query needs: the window plus room for the positives in it."""
        return self.window_end(max_positives) + max_positives


@dataclass
class Selection:
    """Chosen negatives of a block of queries: (Q, num_negatives) scores and corpus indices, best first.

    ``found[q]`` is False where query q got fewer than ``num_negatives``
    (its row is then dropped); ``skipped`` counts the candidates each rule
    removed (those another rule had not removed first).
    """

    scores: torch.Tensor
    indices: torch.Tensor
    found: torch.Tensor
    skipped: dict[str, int]


def exclude_positives(scores: torch.Tensor, indices: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``scores`` with every candidate that is one of its query's positives (``positives`` (Q, P), -1 pads) at -inf."""
    is_positive = (indices[:, :, None] == positives[:, None, :]).any(dim=2) | (indices < 0)
    return scores.masked_fill(is_positive, NEG_INF)


def apply_thresholds(scores: torch.Tensor, least_positive: torch.Tensor, rules: SelectionRules
                     ) -> tuple[torch.Tensor, dict[str, int]]:
    """``scores`` with the margin and score rules applied (removed: -inf), and how many each rule removed."""
    bound = least_positive[:, None]
    tests = {
        "absolute_margin": (rules.absolute_margin, lambda m: scores + m > bound),
        "relative_margin": (rules.relative_margin, lambda m: scores > bound - bound.abs() * m),
        "max_score": (rules.max_score, lambda m: scores > m),
        "min_score": (rules.min_score, lambda m: scores < m),
    }
    skipped = {}
    for name, (value, removes) in tests.items():
        if value is None:
            continue
        removed = removes(value) & torch.isfinite(scores)
        skipped[name] = int(removed.sum())
        scores = scores.masked_fill(removed, NEG_INF)
    return scores, skipped


def select(scores: torch.Tensor, indices: torch.Tensor, positives: torch.Tensor, least_positive: torch.Tensor,
           rules: SelectionRules, window_end: int, rng: random.Random) -> Selection:
    """The negatives of a block of queries from their ranked candidates (best first, -inf / -1 where none).

    ``window_end`` is the resolved ``range_max``; ``rng`` is drawn from
    only with ``sampling_strategy="random"``, once per query in order.
    """
    scores = exclude_positives(scores, indices, positives)
    scores, skipped = apply_thresholds(scores, least_positive, rules)
    if scores.shape[1] < window_end:  # a corpus smaller than the window: pad with nothing, as sentence-transformers
        pad = window_end - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((len(scores), pad), NEG_INF)], dim=1)
        indices = torch.cat([indices, indices.new_full((len(indices), pad), -1)], dim=1)
    # a stable sort keeps the ranking among equal scores: removed candidates go last, the rest keep their order
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    scores, indices = scores[:, rules.range_min : window_end], indices.gather(1, order)[:, rules.range_min : window_end]
    n = rules.num_negatives
    if rules.sampling_strategy == "random":
        options = torch.isfinite(scores).sum(dim=1).clamp(min=n).tolist()
        picked = torch.tensor([sorted(rng.sample(range(m), k=n)) for m in options], dtype=torch.int64)
        picked = picked.reshape(len(scores), n)
        scores, indices = scores.gather(1, picked), indices.gather(1, picked)
    else:
        scores, indices = scores[:, :n], indices[:, :n]
    return Selection(scores, indices, torch.isfinite(scores).all(dim=1), skipped)
