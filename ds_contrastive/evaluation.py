"""Held-out retrieval during a ``launch/train.py`` run, on every rank's share, and the best model it selects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import DataError

if TYPE_CHECKING:
    from .engine import ContrastiveEngine
    from .train_config import TrainConfig


def eval_share(pairs: dict[str, list[str]], rank: int, world_size: int) -> tuple[list[str], list[str]]:
    """This rank's contiguous share of the held-out (query, document) pairs; shares differ by at most one pair."""
    n = len(pairs["anchor"])
    if n < world_size:
        raise DataError(f"{n} held-out pairs cannot be split over {world_size} ranks: give eval_data at least "
                        f"{world_size} pairs, or set eval_pairs higher")
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return pairs["anchor"][start:stop], pairs["positive"][start:stop]


class Evaluation:
    """Held-out retrieval during training on every rank's share, and the best model by ``best_metric``.

    With ``eval_every_steps`` set, a step whose metric beats the best so far
    (strictly) writes the model to ``output_dir/best`` (loadable with
    ``SentenceTransformer``), with the step and metrics in its ``eval.json``.
    """

    def __init__(self, cfg: TrainConfig, pairs: dict[str, list[str]], rank: int, world_size: int,
                 best: dict[str, Any] | None = None) -> None:
        self.share = eval_share(pairs, rank, world_size)
        self.every, self.metric, self.rank = cfg.eval_every_steps, cfg.best_metric, rank
        self.best_dir = Path(cfg.output_dir) / "best"
        self.best = best  # {"step", "metric", "value", "metrics"} of the best evaluation so far

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or bool(self.every and step % self.every == 0)

    def run(self, engine: ContrastiveEngine, step: int) -> dict[str, float]:
        """Evaluate the model as it is after ``step`` steps; keep it as the best one if it is. Collective."""
        metrics = engine.evaluate_retrieval(*self.share)
        if self.every and step > 0 and (self.best is None or metrics[self.metric] > self.best["value"]):
            self.best = {"step": step, "metric": self.metric, "value": metrics[self.metric], "metrics": metrics}
            engine.save(self.best_dir)
            if self.rank == 0:
                (self.best_dir / "eval.json").write_text(json.dumps(self.best, indent=2) + "\n")
        return metrics
