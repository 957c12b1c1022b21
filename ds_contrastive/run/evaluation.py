"""Held-out retrieval during a ``launch/train.py`` run, on every rank's share, and the best model it selects."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.collectives import all_gather_objects, first_error
from ..data.files import columns_digest, rank_slice
from ..errors import DataError

if TYPE_CHECKING:
    from ..engine import ContrastiveEngine
    from .config import TrainConfig


def eval_share(pairs: dict[str, list[str]], rank: int, world_size: int) -> tuple[list[str], list[str]]:
    """This rank's contiguous share of the held-out (query, document) pairs, split as global batches are."""
    n = len(pairs["anchor"])
    if n < world_size:
        raise DataError(f"{n} held-out pairs cannot be split over {world_size} ranks: give eval_data at least "
                        f"{world_size} pairs, or set eval_pairs higher")
    rows = rank_slice(list(range(n)), rank, world_size)
    return pairs["anchor"][rows[0] : rows[-1] + 1], pairs["positive"][rows[0] : rows[-1] + 1]


class Evaluation:
    """Held-out retrieval during training on every rank's share, and the best model by ``best_metric``.

    With ``eval_every_steps`` set, a step whose metric beats the best so far
    (strictly) replaces ``output_dir/best`` (loadable with
    ``SentenceTransformer``; its ``eval.json`` names the step and metrics).
    The new model is written beside it and renamed into place, so a kill
    leaves the previous best whole. A resumed run continues from the best its
    checkpoint holds, unless that best is not comparable (another metric or
    held-out set) or ``output_dir/best`` no longer holds it (the interrupted
    run replaced it after the checkpoint): then the selection starts again
    and the next evaluation writes ``best``.
    """

    def __init__(self, cfg: TrainConfig, pairs: dict[str, list[str]], rank: int, world_size: int,
                 best: dict[str, Any] | None = None) -> None:
        self.share = eval_share(pairs, rank, world_size)
        self.every, self.metric, self.rank = cfg.eval_every_steps, cfg.best_metric, rank
        self.digest = columns_digest(pairs)  # a best value is comparable only on the same pairs
        self.best_dir = Path(cfg.output_dir) / "best"
        self.adapter_only = cfg.save_adapter_only
        self.best = best if best is not None and self._still_best(best) else None  # {"step", "metric", "value", ...}

    def _still_best(self, best: dict[str, Any]) -> bool:
        """Whether a checkpoint's best can go on: same metric and pairs, and output_dir/best holds it (rank 0 looks)."""
        on_disk = None
        if self.rank == 0 and (self.best_dir / "eval.json").is_file():
            on_disk = json.loads((self.best_dir / "eval.json").read_text())
        on_disk = all_gather_objects(on_disk)[0]
        return best.get("metric") == self.metric and best.get("pairs") == self.digest and on_disk == best

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or bool(self.every and step % self.every == 0)

    def run(self, engine: ContrastiveEngine, step: int) -> dict[str, float]:
        """Evaluate the model as it is after ``step`` steps; keep it as the best one if it is. Collective."""
        metrics = engine.evaluate_retrieval(*self.share)
        if self.every and step > 0 and (self.best is None or metrics[self.metric] > self.best["value"]):
            best = {"step": step, "metric": self.metric, "value": metrics[self.metric], "metrics": metrics,
                    "pairs": self.digest}
            self._keep(engine, best)
            self.best = best
        return metrics

    def _keep(self, engine: ContrastiveEngine, best: dict[str, Any]) -> None:
        """Write the model and ``eval.json`` beside ``best``, then swap them in; a failure is raised on every rank."""
        new = self.best_dir.with_name(self.best_dir.name + ".partial")
        engine.save(new, adapter_only=self.adapter_only)  # collective; its failures are raised on every rank
        error = None
        if self.rank == 0:
            try:
                (new / "eval.json").write_text(json.dumps(best, indent=2) + "\n")
                replace_directory(new, self.best_dir)
            except OSError as e:
                error = f"keeping the best model in {self.best_dir} failed: {e}"
        error = first_error(error)
        if error:
            raise OSError(error)


def replace_directory(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``: the old one is renamed away first and removed last."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
