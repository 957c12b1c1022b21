"""ContrastiveEngine: one exact, cached, cross-rank contrastive step on DeepSpeed.

One ``train_step`` is one optimizer step over one global batch (every rank's
shard): :class:`~ds_contrastive.core.step.CachedStep` computes the exact gradient of
the global batch's mean loss with one gradient reduction (see that module for
the step and why it is exact), then one ``engine.step()``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .core.backends import DeepSpeedBackend
from .core.chunks import ChunkCosts, ChunkPlan
from .core.embedding_module import EmbeddingModule, logit_scale
from .core.runtime import init_process_group, world
from .core.shard import tokenizer_settings
from .core.step import CachedStep, Prepared
from .deepspeed_config.loading import load_ds_config, precision, resolve_ds_config, zero_stage
from .errors import NonFiniteLoss
from .losses.infonce import InfoNCE
from .losses.matryoshka import Matryoshka, check_dims
from .run import checkpoint
from .run.retrieval import sharded_retrieval_metrics
from .run.saving import gathered, save_consolidated

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def default_param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and the logit scale are not decayed.

    An empty group is left out (LoRA trains matrices only): ZeRO-3 drops it
    from its optimizer, and a scheduler made for two groups then fails.
    """
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class ContrastiveEngine:
    """Train a SentenceTransformer contrastively on DeepSpeed with exact large-batch gradients.

    Args:
        model: a ``SentenceTransformer`` (transformer + pooling (+ normalize)).
        loss: the contrastive loss: :class:`~ds_contrastive.InfoNCE`,
            :class:`~ds_contrastive.GuidedInfoNCE` (its guide runs in pass 1,
            outside DeepSpeed) or :class:`~ds_contrastive.Matryoshka` of either.
        ds_config: DeepSpeed config path, a shipped config's name (``zero0`` ..
            ``zero3``, ``zero3_offload``) or a dict. Its batch-size keys are
            fixed by the engine (see :func:`~ds_contrastive.deepspeed_config.loading.resolve_ds_config`).
        chunk_tokens: the most padded tokens one encoder forward call may
            hold (a memory cap: the planner cuts chunks where the measured time
            is least, within it).
        chunk_rows: most sequences in one forward call (``None``: no limit).
        optimizer: a callable from parameter groups to a torch optimizer; by
            default AdamW(lr, weight_decay), unless the DeepSpeed config has an
            ``optimizer`` section.
        lr_scheduler: a callable from the optimizer to a scheduler that
            DeepSpeed steps once per ``train_step``.
        anchor_column, positive_column: the batch's column names of those
            roles; every other column is a hard-negative column.
        seed: base of the per-chunk dropout seeds.
        max_length: truncation length (default: the model's ``max_seq_length``).
        retain_tokens: pass-1 graphs pass 2 reuses instead of re-running
            their forward (exact; costs their activation memory): ``"auto"``
            keeps as many as fit ``retain_memory_fraction`` of the free memory
            (or ``retain_memory_gb``), a number that many padded tokens' worth.
        planner, chunk_costs: ``"fastest"`` (the chunk cuts that minimise the
            time measured on this machine, or modelled by fixed ``chunk_costs``)
            or ``"fill"`` (fill every chunk to ``chunk_tokens``, as earlier
            versions did). See :class:`~ds_contrastive.core.step.CachedStep`.
        max_nonfinite_steps: a step whose loss or embedding gradient is not
            finite on some rank is skipped on every rank (no update, the LR
            schedule does not advance, the batch is consumed) and counted;
            this many in a row raise :class:`NonFiniteLoss` on every rank.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: InfoNCE | Matryoshka | None = None,
        ds_config: str | Path | dict[str, Any] = "zero2",
        chunk_tokens: int | None = 16384,
        chunk_rows: int | None = None,
        optimizer: OptimizerFactory | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        lr_scheduler: SchedulerFactory | None = None,
        anchor_column: str = "anchor",
        positive_column: str = "positive",
        seed: int = 0,
        max_length: int | None = None,
        retain_tokens: int | str = "auto",
        max_nonfinite_steps: int = 10,
        planner: str = "fastest",
        chunk_costs: ChunkCosts | None = None,
        retain_memory_fraction: float = 0.5,
        retain_memory_gb: float | None = None,
    ) -> None:
        import deepspeed

        init_process_group()
        self.rank, self.world_size = world()
        self.loss = loss or InfoNCE()
        self.config = resolve_ds_config(load_ds_config(ds_config), self.world_size)
        max_length, lowercase = tokenizer_settings(model, max_length)
        self.step = CachedStep(
            self.loss, model.tokenizer, max_length=max_length, lowercase=lowercase, chunk_tokens=chunk_tokens,
            chunk_rows=chunk_rows, anchor_column=anchor_column, positive_column=positive_column, seed=seed,
            retain_tokens=retain_tokens, planner=planner, chunk_costs=chunk_costs,
            retain_memory_fraction=retain_memory_fraction, retain_memory_gb=retain_memory_gb)

        check_dims(model, self.loss)
        log_scale = self.loss.initial_log_scale() if self.loss.learnable_temperature else None
        self.module = EmbeddingModule(model, log_scale, self.loss.max_scale)
        opt = None
        if "optimizer" not in self.config:
            groups = default_param_groups(self.module, weight_decay)
            opt = optimizer(groups) if optimizer else torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        elif optimizer is not None:
            raise ValueError("the DeepSpeed config has an 'optimizer' section: do not pass optimizer= as well")
        scheduler = lr_scheduler(opt) if (lr_scheduler and opt is not None) else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=opt,
            model_parameters=None if opt is not None else list(self.module.parameters()),
            lr_scheduler=scheduler,
            config=self.config,
        )
        self.device = self.engine.device
        self.zero_stage = zero_stage(self.config)
        self.precision = precision(self.config)
        self.backend = DeepSpeedBackend(self.engine)
        self.guide = self.step.guide
        if self.guide is not None:
            self.guide.to(self.device)
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.step.calibrate(self.backend)  # before any prepare(): the prefetch thread plans with these costs
        self.max_nonfinite_steps = max_nonfinite_steps
        self.global_step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss, in all
        self.consecutive_skips = 0
        self.truncated_texts = 0  # texts cut at max_length, in all
        self.last_plan: ChunkPlan | None = None
        self.last_batch_digest = ""  # identifies the last step's global batch (every rank's texts)

    # --- the step -----------------------------------------------------------------

    def prepare(self, batch: Mapping[str, list[str]]) -> Prepared:
        """Validate, tokenize and plan this rank's shard for :meth:`train_step`, without touching the device.

        Safe to call from a background thread while a step runs, which is what
        :func:`~ds_contrastive.core.prefetch.prefetched` does::

            for prepared in prefetched(engine.prepare, shards):
                engine.train_step(prepared)
        """
        return self.step.prepare(batch)

    def train_step(self, batch: Mapping[str, list[str]] | Prepared) -> dict[str, float]:
        """One optimizer step on the global batch made of every rank's ``batch``.

        ``batch`` maps column names to lists of raw strings (this rank's
        shard), or is that shard passed through :meth:`prepare`. Returns metrics of the whole global batch (equal on every rank),
        plus this rank's own times, throughput and peak memory.
        """
        start = time.perf_counter()
        self.engine.train()
        out = self.step.forward_backward(batch, self.backend, self.global_step)
        self.last_plan, self.last_batch_digest = out.plan, out.batch_digest
        self.truncated_texts += out.truncated
        t_step = time.perf_counter()
        self.global_step += 1
        if out.finite:
            norm = self.backend.step()
            self.consecutive_skips = 0
        else:  # pass 2 did not run: no gradient anywhere, nothing to undo
            norm = float("nan")
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_nonfinite_steps:
                raise NonFiniteLoss(
                    f"{self.consecutive_skips} consecutive steps (up to step {self.global_step}) had a non-finite "
                    f"loss or gradient and were skipped ({self.skipped_steps} in all); check the data, the "
                    "learning rate and the temperature")
        end = time.perf_counter()
        return {**out.report(end - start, self.device), "lr": float(self.engine.get_lr()[0]), "grad_norm": norm,
                "time_optimizer": end - t_step, "time_step": end - start, "skipped": float(not out.finite),
                "skipped_steps": float(self.skipped_steps), "truncated_texts_total": float(self.truncated_texts)}

    def evaluate_retrieval(self, queries: list[str], documents: list[str]) -> dict[str, float]:
        """Retrieval metrics (recall@1/10, MRR@10, nDCG@10) of held-out pairs split over ranks.

        Each rank passes its own share of the pairs; in rank order they make
        the held-out set, where query i's only relevant document is document i.
        Every rank embeds its share with the model as it is now (eval mode: no
        dropout), so a ZeRO-3 model is never gathered on one rank; see
        :func:`~ds_contrastive.run.retrieval.sharded_retrieval_metrics`. Collective;
        the result is equal on every rank.
        """
        training = self.module.training
        self.engine.eval()
        try:
            local, counts = self.step.embed({self.step.anchor_column: queries, self.step.positive_column: documents},
                                            self.backend)
        finally:
            self.engine.train(training)
        return sharded_retrieval_metrics(local[:, 0], local[:, 1], counts)

    # --- checkpoints ----------------------------------------------------------------

    def save_checkpoint(self, root: str | Path, state: dict[str, Any] | None = None,
                        rank_state: dict[str, Any] | None = None, keep: int | None = None) -> Path:
        """Write a checkpoint of this step under ``root`` atomically; return its directory.

        It holds everything an exact resume needs: DeepSpeed's model,
        optimizer and LR-scheduler state (the learnable temperature is a
        parameter), this engine's step and counters, every rank's RNG states,
        and the caller's JSON ``state`` (rank 0's: data position, run ids) and
        ``rank_state`` (each rank's own). ``keep`` newest checkpoints are kept.
        A kill at any moment leaves the previous checkpoint loadable (see
        :mod:`ds_contrastive.run.checkpoint`). Collective: every rank calls it.
        """
        costs = self.step.chunk_costs
        own = {"global_step": self.global_step, "skipped_steps": self.skipped_steps,
               "consecutive_skips": self.consecutive_skips, "truncated_texts": self.truncated_texts,
               "chunk_costs": dataclasses.asdict(costs) if costs else None}
        return checkpoint.save(self.engine, root, self.global_step, {"engine": own, "run": state or {}},
                               rank_state or {}, keep)

    def load_checkpoint(self, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Continue from checkpoint ``path``: returns the caller's (``state``, ``rank_state``) saved with it.

        Call it on a freshly built engine (same model, loss, optimizer,
        scheduler, DeepSpeed config and world size) before any step or
        :meth:`prepare`. The chunk planner continues with the costs the run
        planned with (the plan sets the dropout seeds, so a resumed run draws
        the same masks whatever this machine measures now). Files are read
        with ``torch.load(weights_only=True)``. Collective.
        """
        costs = self._planned_costs(path) if self.step.planner == "fastest" else None  # refused before loading
        state, mine = checkpoint.load(self.engine, path)
        own = state["engine"]
        self.global_step, self.skipped_steps = own["global_step"], own["skipped_steps"]
        self.consecutive_skips, self.truncated_texts = own["consecutive_skips"], own["truncated_texts"]
        if costs is not None:
            self.step.chunk_costs = costs
        return state["run"], mine

    def _planned_costs(self, path: str | Path) -> ChunkCosts:
        """The costs a resumed run plans with: those it planned with before, whatever this machine measures."""
        saved = checkpoint.read_state(path)["engine"].get("chunk_costs")
        if saved is None:
            raise ValueError(f"checkpoint {path} was written by a run whose chunks were not planned by measured "
                             "costs (an earlier version's fill-to-budget plans): resume it with planner='fill' "
                             "and the same chunk_tokens")
        costs = ChunkCosts(**saved)
        if self.rank == 0 and costs != self.step.chunk_costs:
            print(f"ds_contrastive: planning with the checkpoint's chunk costs {costs} (this run had "
                  f"{self.step.chunk_costs}), so that the resumed run draws the same chunks and dropout masks",
                  flush=True)
        return costs

    # --- saving ---------------------------------------------------------------------

    def save(self, path: str | Path, adapter_only: bool = False) -> None:
        """Write the model so that ``SentenceTransformer(path)`` loads it (ZeRO-3: consolidated; LoRA: merged).

        Collective: every rank must call it. Rank 0 writes; a failure there is raised on every rank.
        Under ZeRO-3 the transformer is gathered one submodule at a time. LoRA
        adapters are merged into their layers (a model that loads without
        peft), or with ``adapter_only`` written alone as peft's adapter files.
        """
        path = Path(path)
        info = {"temperature": self.temperature(), "global_step": self.global_step}  # collective under ZeRO-3

        def write() -> None:
            self.module.model.save(str(path))
            (path / "ds_contrastive.json").write_text(json.dumps(info, indent=2) + "\n")

        save_consolidated(self.module.model, self.zero_stage == 3, self.rank == 0, write, f"{path} (rank 0)",
                          "adapter" if adapter_only else "merged")

    def temperature(self) -> float:
        """The current temperature (the learnable one if it is learned)."""
        log_scale = self.module.log_scale
        if log_scale is None:
            return self.loss.temperature
        with gathered([log_scale], self.zero_stage == 3):
            return 1.0 / float(logit_scale(log_scale.detach(), self.loss.max_scale))
