"""What a ``launch/train.py`` run logs, and where: the metric layout, its reduction over ranks, W&B and metrics.jsonl.

Every optimizer step is one record (one W&B step), logged by rank 0 with
values that hold for the whole job:

- ``train/``: loss, accuracy, temperature, lr, grad_norm, skipped steps,
  truncated texts; per dataset ``train/<name>/loss`` and ``.../accuracy``;
  Matryoshka ``loss@<dim>`` and ``accuracy@<dim>``;
- ``negatives/``: global batch size, unmasked candidates per anchor, masked
  duplicates, guide-masked fraction and similarity per term, mean similarity
  of the positive and of the hardest unmasked document negative;
- ``perf/``: samples and non-pad tokens per second, padding fraction, the
  step's phases (prepare, pass 1, guide, gather + loss, pass 2, optimizer),
  chunks per step. Times are the slowest rank's: the step waits for it.
- ``system/``: peak memory per rank (accelerator memory allocated; on the
  CPU, resident set size), its min and max over ranks and the rank of the max;
- ``eval/``: held-out retrieval (recall@1/10, MRR@10, nDCG@10) when evaluated.

The layout is the README's table; :func:`define_metrics` tells W&B to plot
every section against the optimizer step and which summary each key keeps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..core.collectives import gather_rows
from ..core.runtime import world

# this rank's own measurements; all others are of the global batch, equal on every rank
RANK_VALUES = ("time_step", "time_prepare", "time_pass1", "time_guide", "time_gather_loss", "time_pass2",
               "time_optimizer", "peak_memory_gb")
NEGATIVES = ("global_batch_size", "candidates_per_anchor", "masked_duplicates", "positive_similarity",
             "hardest_negative_similarity")
PERF = ("padding_fraction", "chunks", "kept_chunks")
STEP_KEY = "train/step"
SUMMARIES = {"train/loss": "min", "train/accuracy": "max", "perf/samples_per_second": "mean",
             "perf/tokens_per_second": "mean", "system/peak_memory_gb_max": "max"}
SECTIONS = ("train", "negatives", "perf", "system", "eval")


def rank_values(metrics: dict[str, float], device: torch.device) -> dict[str, list[float]]:
    """Every rank's own ``RANK_VALUES`` of this step, in rank order (one collective, every rank calls it)."""
    mine = torch.tensor([[metrics[k] for k in RANK_VALUES]], dtype=torch.float64, device=device)
    every = gather_rows(mine, [1] * world()[1]).cpu()
    return {k: every[:, i].tolist() for i, k in enumerate(RANK_VALUES)}


def sectioned(metrics: dict[str, float], ranks: dict[str, list[float]]) -> dict[str, float]:
    """One step's engine metrics in the documented layout, with per-rank values reduced over ranks.

    ``metrics`` is what :meth:`~ds_contrastive.ContrastiveEngine.train_step`
    returned on this rank; ``ranks`` is :func:`rank_values` of it.
    """
    slowest = max(ranks["time_step"])
    memory = ranks["peak_memory_gb"]
    out = {
        "perf/samples_per_second": metrics["global_batch_size"] / slowest,
        "perf/tokens_per_second": metrics["tokens"] / slowest,
        "system/peak_memory_gb_min": min(memory),
        "system/peak_memory_gb_max": max(memory),
        "system/peak_memory_gb_max_rank": float(memory.index(max(memory))),
    }
    for key, value in metrics.items():
        if key in RANK_VALUES:
            if key.startswith("time_"):
                out[f"perf/{key}"] = max(ranks[key])
        elif key.startswith("guide_masked_"):  # guide_masked_fraction_anchor_doc -> .../guide_masked_fraction/anchor_doc
            _, _, kind, term = key.split("_", 3)
            out[f"negatives/guide_masked_{kind}/{term}"] = value
        elif key in NEGATIVES:
            out[f"negatives/{key}"] = value
        elif key in PERF:
            out[f"perf/{key}"] = value
        elif key not in ("samples_per_second", "tokens_per_second", "tokens"):  # recomputed above from the slowest
            out[f"train/{key}"] = value
    return out


def define_metrics(run: Any) -> None:
    """Plot every section against the optimizer step (also across resumes) and set each key's summary."""
    run.define_metric(STEP_KEY, hidden=True)
    for section in SECTIONS:  # the best evaluation is the one to remember
        run.define_metric(f"{section}/*", step_metric=STEP_KEY, **({"summary": "max"} if section == "eval" else {}))
    for key, summary in SUMMARIES.items():
        run.define_metric(key, step_metric=STEP_KEY, summary=summary)


class Tracker:
    """Rank 0's W&B run and local metrics file; every other rank logs nothing.

    ``run_config`` (training config, DeepSpeed config, package versions,
    world size; already redacted) goes to W&B and to ``run_config.json``. A
    resumed run (``resume_step`` set) continues the W&B run ``run_id`` and
    drops from ``metrics.jsonl`` the records after ``resume_step``: it is about
    to compute those steps again (W&B keeps the values it already has).
    ``WANDB_MODE=offline`` and ``disabled`` are W&B's own switches and work
    as documented there.
    """

    def __init__(self, output_dir: str | Path, run_config: dict[str, Any], rank: int, wandb_args: dict[str, Any] | None,
                 resume_step: int | None = None, run_id: str | None = None) -> None:
        self.active = rank == 0
        self.run = None
        self.run_id = run_id
        self.first_step = 0
        if not self.active:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
        path = out / "metrics.jsonl"
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if _record_step(line) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)
        self.metrics_file = path.open("a")
        if wandb_args is not None:
            import wandb

            resume = {"id": run_id, "resume": "allow"} if run_id else {}
            self.run = wandb.init(dir=str(out), config=run_config, **wandb_args, **resume)
            define_metrics(self.run)
            self.run_id = self.run.id
            self.first_step = self.run.step  # a resumed run's steps before this are already in W&B

    def log(self, metrics: dict[str, float], step: int, record: dict[str, Any] | None = None) -> None:
        """Log ``metrics`` at ``step``; ``record`` (strings such as the batch digest) goes to the file only."""
        if not self.active:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics, **(record or {})}) + "\n")
        self.metrics_file.flush()
        if self.run is not None and step >= self.first_step:
            self.run.log({**metrics, STEP_KEY: step}, step=step)

    def finish(self) -> None:
        if self.active:
            self.metrics_file.close()
            if self.run is not None:
                self.run.finish()


def _record_step(line: str) -> float:
    """The step of one metrics.jsonl line; infinity for a line cut short by a kill (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
