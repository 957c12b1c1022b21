"""The training loop behind ``launch/train.py``: data, engine, logging, evaluation and saving."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.prefetch import prefetched
from ..core.runtime import (
    collective_failures,
    init_process_group,
    set_collective_timeout,
    share_cpu_threads,
    shutdown,
    world,
)
from ..data.mixture import MixedBatches, by_role
from ..data.streaming import StreamingBatches
from ..deepspeed_config.auto import format_resolved, resolve_auto, warmup_steps
from ..deepspeed_config.checks import check_start
from ..deepspeed_config.loading import load_ds_config
from ..engine import ContrastiveEngine
from . import checkpoint
from .config import TrainConfig, argument_parser, load_train_config, redacted
from .console import clean_errors, quiet_other_ranks
from .evaluation import Evaluation
from .output_dir import SUMMARY, checkpoint_root, claimed, entries, model_files
from .setup import (
    build_loss,
    build_model,
    enable_gradient_checkpointing,
    few_negatives_warning,
    hidden_size,
    load_batches,
    load_eval_data,
    step_options,
)
from .tracking import Tracker, rank_values, sectioned


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up to 1 over warmup_ratio of the steps, then linear decay to 0."""
    warmup = warmup_steps(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_precision(ds_config: dict[str, Any], precision: str | None) -> dict[str, Any]:
    if precision is not None:
        ds_config["bf16"] = {**ds_config.get("bf16", {}), "enabled": precision == "bf16"}
    return ds_config


def run_identity(cfg: TrainConfig, total_steps: int, fingerprint: str) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint (what decides its batches)."""
    columns = [cfg.anchor_column, cfg.positive_column, *cfg.negative_columns]
    datasets = [{k: v for k, v in entry.items() if k != "path"} for entry in cfg.datasets]  # files may move
    return {"total_steps": total_steps, "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
            "data": fingerprint, "columns": columns, "datasets": datasets, "streaming": cfg.streaming,
            "stream_window_batches": cfg.stream_window_batches if cfg.streaming else None,
            "max_length": cfg.max_length, "model": cfg.model, "planner": cfg.planner,  # the plan sets dropout seeds
            "prefixes": [cfg.query_prefix, cfg.document_prefix], "lora": lora_identity(cfg)}


def lora_identity(cfg: TrainConfig) -> list[Any] | None:
    """The adapters a checkpoint's optimizer state and weights were made for (None: every weight trains)."""
    if cfg.lora_rank is None:
        return None
    return [cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, sorted(cfg.lora_target_modules)]


# what a checkpoint written before a key existed had: the planner of earlier versions filled chunks
IDENTITY_BEFORE = {"planner": "fill", "prefixes": ["", ""], "lora": None, "eos_appended": False}


def check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    saved = {**IDENTITY_BEFORE, **saved}
    differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if differ:
        raise checkpoint.CheckpointError(f"cannot resume from {path}: the run differs ({'; '.join(differ)})")


def data_position(batches: MixedBatches | StreamingBatches, step: int) -> dict[str, Any]:
    """Where the data stands after ``step`` global batches: each dataset's batches used, epoch and batch."""
    if isinstance(batches, StreamingBatches):
        return {"global_batches_used": step}
    used = batches.batches_used(step)
    return {s.name: {"batches_used": used[s.name], "epoch": used[s.name] // s.batches.steps_per_epoch,
                     "batch_in_epoch": used[s.name] % s.batches.steps_per_epoch} for s in batches.sources}


def versions() -> dict[str, str]:
    import deepspeed
    import sentence_transformers
    import transformers

    from .. import __version__

    return {"ds_contrastive": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__}


def train(cfg: TrainConfig, ds_config_path: str) -> dict[str, Any]:
    """Train as configured; return the summary (metrics before/after, wall time) on every rank.

    A collective that fails because another rank died or hung raises
    :class:`~ds_contrastive.errors.RankFailure` within
    ``collective_timeout_seconds``.
    """
    started = time.perf_counter()
    init_process_group(cfg.collective_timeout_seconds)
    hint = (f"Continue from the newest checkpoint in {checkpoint_root(cfg)} with --resume auto. "
            if cfg.checkpoint_every_steps or cfg.checkpoint_every_minutes else "")
    with collective_failures(cfg.collective_timeout_seconds, hint):
        summary = _train(cfg, ds_config_path, started)
    if world()[0] == 0:
        print(f"saved {cfg.output_dir} after {summary['steps']} steps in {summary['wall_seconds']:.0f} s", flush=True)
    shutdown()
    return summary


def _train(cfg: TrainConfig, ds_config_path: str, started: float) -> dict[str, Any]:
    """Check the configs and read the data, then train in an output_dir this run holds; write summary.json."""
    rank, world_size = world()
    # the DeepSpeed config against the training config, before any data or model loads
    ds_config = check_start(apply_precision(load_ds_config(ds_config_path), cfg.precision), cfg, world_size,
                            ds_config_path)
    batches, examples, fingerprint = load_batches(cfg)
    if rank == 0 and (warning := few_negatives_warning(cfg)):
        print(warning, flush=True)
    with claimed(cfg) as resume_from:
        summary = _run(cfg, ds_config, ds_config_path, batches, examples, fingerprint, resume_from)
        summary["wall_seconds"] = time.perf_counter() - started
        if rank == 0:
            (Path(cfg.output_dir) / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run(cfg: TrainConfig, ds_config: dict[str, Any], ds_config_path: str, batches: MixedBatches | StreamingBatches,
         examples: int | None, fingerprint: str, resume_from: Path | None) -> dict[str, Any]:
    """The run itself: model, engine, evaluation, the steps (with checkpoints), the saved model."""
    rank, world_size = world()
    total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    identity = run_identity(cfg, total_steps, fingerprint)
    eval_pairs = load_eval_data(cfg)
    model, identity["eos_appended"] = build_model(cfg, cfg.seed)  # the texts' tokens depend on it
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    ds_config, resolved = resolve_auto(ds_config, cfg, total_steps, hidden_size(model), ds_config_path)
    if rank == 0:
        print(format_resolved(resolved, ds_config_path), flush=True)
    summary: dict[str, Any] = {"world_size": world_size, "steps": total_steps, "train_examples": examples}

    engine = ContrastiveEngine(
        model, build_loss(cfg), ds_config=ds_config, lr=cfg.lr,
        weight_decay=cfg.weight_decay, lr_scheduler=warmup_linear_decay(total_steps, cfg.warmup_ratio),
        anchor_column="anchor", positive_column="positive", seed=cfg.seed,  # the roles MixedBatches names
        max_nonfinite_steps=cfg.max_nonfinite_steps, **step_options(cfg),
    )
    set_collective_timeout(cfg.collective_timeout_seconds)  # the groups DeepSpeed made too
    run_id, bad_rows, best = None, 0, None
    if resume_from is not None:
        saved = checkpoint.read_state(resume_from)["run"]
        check_identity(resume_from, saved["identity"], identity)
        saved, mine = engine.load_checkpoint(resume_from)
        if saved["data_position"] != data_position(batches, engine.global_step):
            raise checkpoint.CheckpointError(f"{resume_from}: the data position it holds is not where this run's "
                                             "data stands at that step (a different ds_contrastive version?)")
        run_id, bad_rows, best = saved.get("wandb_run_id"), mine.get("bad_rows", 0), saved.get("best_eval")
        summary["resumed_from"] = str(resume_from)
        if rank == 0:
            print(f"resumed from {resume_from} at step {engine.global_step} of {total_steps}", flush=True)
    start_step = engine.global_step
    calibration = engine.step.calibration  # what the planner and retain_tokens=auto measured on this machine
    run_config = redacted({"train": asdict(cfg), "deepspeed": engine.config, "versions": versions(),
                           "world_size": world_size, "calibration": calibration.to_json() if calibration else None,
                           "chunk_costs": asdict(engine.step.chunk_costs) if engine.step.chunk_costs else None})
    wandb_args = ({"project": cfg.wandb_project, "name": cfg.wandb_run_name, "tags": cfg.wandb_tags}
                  if cfg.wandb else None)
    tracker = Tracker(cfg.output_dir, run_config, rank, wandb_args, start_step if resume_from else None, run_id)
    evaluation = Evaluation(cfg, eval_pairs, rank, world_size, best) if eval_pairs else None
    if evaluation is not None and resume_from is None:
        summary["before"] = evaluation.run(engine, 0)
        tracker.log({f"eval/{k}": v for k, v in summary["before"].items()}, 0)
        if rank == 0:
            print(f"held-out retrieval before training: {_fmt(summary['before'])}", flush=True)
    schedule = checkpoint.Schedule(cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes, engine.device)
    progress = None
    if rank == 0 and cfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stdout)
    items = training_items(cfg, batches, rank, world_size, start_step, total_steps, bad_rows)
    # the next shard is read and tokenized in a background thread while this step runs
    prepare = lambda item: (item[0], engine.prepare(item[1]), item[2])
    for step, (name, prepared, bad_rows) in enumerate(prefetched(prepare, items), start=start_step + 1):
        metrics = engine.train_step(prepared)
        logged = sectioned(metrics, rank_values(metrics, engine.device))
        if cfg.datasets:  # each step's batch comes from one dataset
            logged.update({f"train/{name}/loss": metrics["loss"], f"train/{name}/accuracy": metrics["accuracy"]})
        if cfg.streaming:
            logged["train/bad_rows_skipped"] = float(bad_rows)  # this rank's (rank 0's in the logs)
        tracker.log(logged, step, {"dataset": name, "batch_digest": engine.last_batch_digest})
        if progress is not None:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{logged['perf/samples_per_second']:.1f}")
            progress.update()
        if evaluation is not None and evaluation.due(step, total_steps):
            summary["after"] = evaluation.run(engine, step)
            tracker.log({f"eval/{k}": v for k, v in summary["after"].items()}, step)
        if step < total_steps and schedule.due(step):
            state = {"identity": identity, "data_position": data_position(batches, step),
                     "wandb_run_id": tracker.run_id, "config": run_config["train"], "versions": run_config["versions"],
                     "best_eval": evaluation.best if evaluation else None}
            engine.save_checkpoint(checkpoint_root(cfg), state, {"bad_rows": bad_rows}, cfg.keep_checkpoints)
    if progress is not None:
        progress.close()

    before = entries(Path(cfg.output_dir)) if rank == 0 else {}
    engine.save(cfg.output_dir, adapter_only=cfg.save_adapter_only)
    if rank == 0:  # what the save wrote: an --overwrite_output_dir of this run removes exactly these
        summary["model_files"] = model_files(Path(cfg.output_dir), before)
    if evaluation is not None:
        if rank == 0:
            print(f"held-out retrieval after training:  {_fmt(summary['after'])}", flush=True)
        if evaluation.best is not None:
            summary["best"] = evaluation.best
    tracker.finish()
    return summary


def training_items(cfg: TrainConfig, batches: MixedBatches | StreamingBatches, rank: int, world_size: int,
                   start_step: int, total_steps: int, bad_rows: int) -> Iterator[tuple[str, dict[str, list[str]], int]]:
    """(dataset name, this rank's shard, bad rows this rank skipped so far) of steps start_step .. total_steps - 1."""
    if isinstance(batches, MixedBatches):
        for step in range(start_step, total_steps):
            yield (*batches.shard(step, rank, world_size), 0)
        return
    batches.bad_rows = bad_rows  # the count at the checkpoint
    stream = batches.shards(rank, world_size, start_step)
    for _ in range(start_step, total_steps):
        shard = by_role(next(stream), cfg.anchor_column, cfg.positive_column, cfg.query_prefix, cfg.document_prefix)
        yield "train", shard, batches.bad_rows  # read right after this shard: the prefetch may run ahead


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> None:
    """``launch/train.py`` and ``deepspeed --module ds_contrastive.train``: parse, load the configs, train.

    A mistake in the configs, the data or the output_dir ends the run with one
    ``error:`` line and its exit code (:mod:`~ds_contrastive.run.console`).
    """
    argv = sys.argv[1:] if argv is None else argv
    quiet_other_ranks()
    share_cpu_threads()
    with clean_errors(debug="--debug" in argv):
        args = argument_parser().parse_args(argv)
        overrides = {k: v for k, v in vars(args).items() if k not in ("config", "deepspeed_config", "debug",
                                                                       "local_rank")}
        cfg = load_train_config(args.config, overrides)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        train(cfg, args.deepspeed_config)
