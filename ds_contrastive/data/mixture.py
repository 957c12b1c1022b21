"""Global batches drawn from several datasets: one dataset per batch, chosen by a seeded weighted draw.

Embedding models are trained on mixtures of dozens of datasets. In-batch
negatives are only meaningful within one task (a question's negatives should
be other answers, not code snippets), so every global batch comes from a
single dataset. Which one is drawn from the weights with a generator seeded
by ``(seed, step)`` alone: every rank draws the same dataset without
communicating, and a run resumed at step ``s`` continues exactly where it
stopped, because the position in each dataset is the number of times it was
drawn before ``s``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import DataError
from .files import GlobalBatches


@dataclass
class Source:
    """One dataset of the mixture.

    Args:
        name: shown in logs (``train/<name>/loss``); unique in the mixture.
        batches: its global batches (its own epochs and shuffling).
        weight: relative probability that a step draws this dataset.
        anchor_column, positive_column: its columns of those roles; every
            other column of ``batches.data`` is a hard-negative column.
        query_prefix, document_prefix: prepended to anchors and to positives
            and negatives (instructions such as "query: " / "passage: ").
    """

    name: str
    batches: GlobalBatches
    weight: float
    anchor_column: str = "anchor"
    positive_column: str = "positive"
    query_prefix: str = ""
    document_prefix: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise DataError(f"dataset {self.name!r}: weight must be a finite number > 0, got {self.weight!r}")
        for role, column in (("anchor", self.anchor_column), ("positive", self.positive_column)):
            if column not in self.batches.data:
                raise DataError(f"dataset {self.name!r} has no {role} column {column!r} "
                                f"(columns: {sorted(self.batches.data)})")


class MixedBatches:
    """Each step's dataset, its batch within that dataset, and this rank's shard of it."""

    def __init__(self, sources: list[Source], seed: int) -> None:
        if not sources:
            raise DataError("a mixture needs at least one dataset")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DataError(f"dataset names must be unique, got {names}")
        self.sources = sources
        self.seed = seed
        total = sum(s.weight for s in sources)
        self.probabilities = [s.weight / total for s in sources]
        self._cumulative = [sum(self.probabilities[: i + 1]) for i in range(len(sources))]
        self._drawn: list[tuple[int, int]] = []  # (dataset, its own step) of steps 0, 1, ...
        self._counts = [0] * len(sources)

    @property
    def steps_per_epoch(self) -> int:
        """Steps that visit each dataset once in expectation: the sum of the datasets' own epochs."""
        return sum(s.batches.steps_per_epoch for s in self.sources)

    def draw(self, step: int) -> int:
        """The dataset of ``step``, from a generator seeded by (seed, step) only."""
        u = random.Random(f"ds_contrastive-mixture:{self.seed}:{step}").random()
        return next((i for i, c in enumerate(self._cumulative) if u < c), len(self.sources) - 1)

    def position(self, step: int) -> tuple[int, int]:
        """(dataset index, that dataset's own step) of global step ``step``."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        while len(self._drawn) <= step:
            d = self.draw(len(self._drawn))
            self._drawn.append((d, self._counts[d]))
            self._counts[d] += 1
        return self._drawn[step]

    def batches_used(self, step: int) -> dict[str, int]:
        """How many global batches of each dataset steps 0 .. step - 1 used (the data position at ``step``)."""
        if step > 0:
            self.position(step - 1)
        used = dict.fromkeys((s.name for s in self.sources), 0)
        for d, _ in self._drawn[:step]:
            used[self.sources[d].name] += 1
        return used

    def shard(self, step: int, rank: int, world_size: int) -> tuple[str, dict[str, list[str]]]:
        """(dataset name, this rank's shard) of ``step``, with columns renamed to the engine's roles.

        The shard's columns are ``anchor``, ``positive`` and ``negative_1``,
        ``negative_2``, ... in the dataset's column order, prefixes applied.
        """
        d, own_step = self.position(step)
        source = self.sources[d]
        raw = source.batches.shard(own_step, rank, world_size)
        return source.name, by_role(raw, source.anchor_column, source.positive_column, source.query_prefix,
                                    source.document_prefix)


def by_role(raw: dict[str, list[str]], anchor: str, positive: str, query_prefix: str = "",
            document_prefix: str = "") -> dict[str, list[str]]:
    """A shard with the engine's column names: ``anchor``, ``positive``, ``negative_1``, ... (prefixes applied)."""
    negatives = [c for c in raw if c not in (anchor, positive)]
    shard = {"anchor": [query_prefix + t for t in raw[anchor]],
             "positive": [document_prefix + t for t in raw[positive]]}
    for k, column in enumerate(negatives, start=1):
        shard[f"negative_{k}"] = [document_prefix + t for t in raw[column]]
    return shard
