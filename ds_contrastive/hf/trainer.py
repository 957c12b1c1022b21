"""ContrastiveTrainer: ds_contrastive's exact cached step inside sentence-transformers' Trainer.

sentence-transformers' cached losses run inside ``compute_loss`` and leave the
backward to the Trainer, which under DeepSpeed means ``engine.backward`` +
``engine.step`` once per ``accelerator.backward`` call. A cached loss needs
several backward calls (one per chunk) before one reduction and one step, so
it fails under ZeRO-2/3 and reduces once per mini-batch under DDP. This
trainer replaces the training step instead:

- the data collator hands over raw strings; the step tokenizes them itself;
- :class:`~ds_contrastive.core.step.CachedStep` runs pass 1, the cross-rank gather,
  the tiled loss and pass 2 with one gradient reduction, through the
  DeepSpeed engine (ZeRO 0-3) or the (DDP-wrapped) module;
- under DeepSpeed it then calls ``engine.step()`` once, which is what
  ``accelerator.backward`` would have done (the Trainer's own
  ``optimizer.step()`` is a no-op there; its scheduler is stepped by the
  engine or, when the engine does not own it, by the Trainer, once per step
  either way); without DeepSpeed the Trainer clips, steps and schedules as usual.

Everything else is the Trainer's: datasets, the evaluator, logging and
``report_to``, checkpoints, resuming, schedules, ``save_model`` (consolidated
under ZeRO-3).

Importing this module keeps DeepSpeed from compiling its CPU shared-memory
op (:func:`~ds_contrastive.core.runtime.skip_shm_comm_op`): the training
arguments, made before the Trainer, start DeepSpeed's process group.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from torch import nn
from transformers import Trainer

from ..core.backends import Backend, DeepSpeedBackend, TorchBackend, sentence_embedding
from ..core.chunks import ChunkCosts
from ..core.runtime import skip_shm_comm_op
from ..core.shard import tokenizer_settings
from ..core.step import CachedStep
from ..losses.infonce import InfoNCE
from ..losses.matryoshka import Matryoshka, check_dims
from ..run.adapters import lora_layers
from ..run.checkpoint import weights_only_loads
from ..run.saving import save_consolidated

skip_shm_comm_op()

RESERVED_COLUMNS = ("label", "score", "dataset_name", "return_loss")


class RawTextCollator:
    """Collate rows into ``{column: [raw strings]}`` in the dataset's column order.

    ds_contrastive tokenizes inside the step (length-sorted chunks, per-rank),
    so the collator only groups strings. ``prompts`` follows
    sentence-transformers: one string prefixed to every column, or a
    ``{column: prompt}`` mapping. Values are not checked here (one rank's
    collator failing would leave the others waiting); the step checks them
    on every rank and raises the same error everywhere.
    """

    def __init__(self, prompts: str | dict[str, str] | None = None) -> None:
        self.prompts = prompts
        self.valid_label_columns = ["label", "score"]  # read by sentence-transformers' batch samplers

    def prompt(self, column: str) -> str:
        if isinstance(self.prompts, str):
            return self.prompts
        return (self.prompts or {}).get(column, "")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        batch = {}
        for column in rows[0]:
            prefix = self.prompt(column)
            batch[column] = [prefix + r[column] if prefix and isinstance(r[column], str) else r[column] for r in rows]
        return batch


class ContrastiveObjective(nn.Module):
    """The Trainer's ``loss`` module: the model (whose parameters the optimizer takes) and the objective.

    sentence-transformers builds the optimizer from ``trainer.loss``'s
    parameters and moves the loss to the device, so the Trainer needs an
    ``nn.Module`` holding the model. The objective itself (InfoNCE, guided,
    Matryoshka) runs in :class:`ContrastiveTrainer`'s training step, never
    through ``forward``.
    """

    def __init__(self, model: SentenceTransformer, objective: InfoNCE | Matryoshka) -> None:
        super().__init__()
        self.model = model
        self.objective = objective  # a plain object: its guide stays out of the optimizer and off ZeRO

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "ContrastiveObjective is run by ContrastiveTrainer's training step (cached, gathered), not called "
            "directly; use ContrastiveTrainer, or a sentence-transformers loss with SentenceTransformerTrainer")


class ContrastiveTrainer(SentenceTransformerTrainer):
    """A ``SentenceTransformerTrainer`` whose step is ds_contrastive's exact cached, gathered step.

    The global batch is ``per_device_train_batch_size x world size``; its loss
    and gradient are those of one full batch, whatever ``chunk_tokens`` /
    ``chunk_rows`` cut it into. Column convention as in sentence-transformers:
    the first column is the anchor, the second the positive, every further
    column a hard negative; a ``label`` or ``score`` column is refused.

    Args:
        model: the ``SentenceTransformer`` to train.
        args: ``SentenceTransformerTrainingArguments``; ``deepspeed=`` for ZeRO 0-3.
            ``gradient_accumulation_steps`` must be 1 (raise the batch size
            instead: the cache makes that free in memory) and fp16 is refused
            (use bf16).
        loss: :class:`~ds_contrastive.InfoNCE`, :class:`~ds_contrastive.GuidedInfoNCE`
            or :class:`~ds_contrastive.Matryoshka` of either; fixed temperature.
        chunk_tokens, chunk_rows: the most padded tokens and rows of one
            encoder forward call (memory caps: memory is set by these, not by
            the batch; within them the planner cuts where the time is least).
        max_length: truncation (default: the model's ``max_seq_length``).
        retain_tokens, retain_memory_fraction, retain_memory_gb: pass-1 graphs
            pass 2 reuses instead of re-running their forward (exact; costs
            their activation memory): ``"auto"`` keeps what fits the budget.
        planner, chunk_costs: how chunks are cut (``"fastest"`` by the time
            measured on this machine or the given costs, ``"fill"`` as earlier
            versions). See :class:`~ds_contrastive.core.step.CachedStep` for all five.
        save_adapter_only: a LoRA model's ``save_model`` writes the adapter
            alone (peft's files) instead of the merged model.
        Every other keyword goes to ``SentenceTransformerTrainer``.

    The Trainer's own ``gradient_checkpointing`` (``activation_checkpointing``)
    checkpoints the transformer's layers inside each chunk, non-reentrant, exactly.
    """

    def __init__(self, model: SentenceTransformer, args: SentenceTransformerTrainingArguments | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, loss: InfoNCE | Matryoshka | None = None,
                 chunk_tokens: int | None = 16384, chunk_rows: int | None = None, max_length: int | None = None,
                 retain_tokens: int | str = "auto", planner: str = "fastest", chunk_costs: ChunkCosts | None = None,
                 retain_memory_fraction: float = 0.5, retain_memory_gb: float | None = None,
                 save_adapter_only: bool = False, **kwargs: Any) -> None:
        objective = loss or InfoNCE()
        if objective.learnable_temperature:
            raise ValueError(
                "ContrastiveTrainer takes a fixed temperature (learnable_temperature=False): the Trainer's "
                "model and optimizer hold only the SentenceTransformer; train a learnable temperature with "
                "ContrastiveEngine / launch/train.py")
        if args is not None:
            check_arguments(args)
        columns = [dataset_columns(d, name) for d, name in ((train_dataset, "train"), (eval_dataset, "eval"))
                   if d is not None]
        if "data_collator" in kwargs:
            raise ValueError("ContrastiveTrainer brings its own raw-text collator; do not pass data_collator")
        if len(columns) == 2 and columns[1][:2] != columns[0][:2]:
            raise ValueError(f"eval_dataset's anchor and positive columns {columns[1][:2]} differ from "
                             f"train_dataset's {columns[0][:2]}")
        check_dims(model, objective)
        if save_adapter_only and not lora_layers(model):
            raise ValueError("save_adapter_only needs a model with LoRA adapters (peft)")
        if args is not None and args.prompts and any(getattr(m, "include_prompt", True) is False for m in model):
            raise ValueError("prompts with a Pooling module that excludes prompt tokens (include_prompt=False) are "
                             "not supported: the step pools every token it embeds")
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         loss=ContrastiveObjective(model, objective),
                         data_collator=RawTextCollator(args.prompts if args is not None else None), **kwargs)
        check_arguments(self.args)
        anchor, positive = columns[0][:2] if columns else ("anchor", "positive")
        length, lowercase = tokenizer_settings(model, max_length)
        self.cached_step = CachedStep(
            objective, model.tokenizer, max_length=length, lowercase=lowercase, chunk_tokens=chunk_tokens,
            chunk_rows=chunk_rows, anchor_column=anchor, positive_column=positive, seed=self.args.seed,
            retain_tokens=retain_tokens, planner=planner, chunk_costs=chunk_costs,
            retain_memory_fraction=retain_memory_fraction, retain_memory_gb=retain_memory_gb)
        if self.cached_step.guide is not None:
            self.cached_step.guide.to(self.args.device)
        self.deepspeed_grad_norm: float | None = None
        self.save_adapter_only = save_adapter_only

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; DeepSpeed checkpoints it resumes from are read with ``weights_only=True``.

        (``resume_from_checkpoint=`` and ``load_best_model_at_end`` load them
        through DeepSpeed, which would otherwise unpickle them unrestricted.)
        """
        with weights_only_loads():
            return super().train(*args, **kwargs)

    def backend(self, model: nn.Module) -> Backend:
        """How the step reaches ``model``: the DeepSpeed engine, or the (DDP-wrapped) module."""
        if self.is_deepspeed_enabled and hasattr(model, "zero_optimization_stage"):
            return DeepSpeedBackend(model, sentence_embedding)
        return TorchBackend(model, self.args.device)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One optimizer step's gradient (DeepSpeed: and the step) from this rank's shard of raw strings."""
        model.train()
        t0 = time.perf_counter()
        backend = self.backend(model)
        out = self.cached_step.forward_backward(inputs, backend, self.state.global_step)
        t1 = time.perf_counter()
        if isinstance(backend, DeepSpeedBackend) and out.finite:
            # what accelerator.backward does at a boundary; the Trainer's optimizer.step() is a no-op here
            self.deepspeed_grad_norm = backend.step()
        # a non-finite loss on some rank: pass 2 did not run, so no parameter has a gradient and the
        # optimizer's step changes nothing (DeepSpeed's is not taken at all)
        t2 = time.perf_counter()
        metrics = {**out.report(t2 - t0, backend.device), "skipped": float(not out.finite)}
        if isinstance(backend, DeepSpeedBackend):
            metrics["time_optimizer"] = t2 - t1
        return self.track(metrics, backend.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the gradient norm DeepSpeed leaves out at ZeRO-0."""
        if "loss" in logs and logs.get("grad_norm") is None and self.deepspeed_grad_norm is not None:
            logs = {**logs, "grad_norm": self.deepspeed_grad_norm}
        super().log(logs, start_time)

    def _load_best_model(self) -> None:
        # sentence-transformers' version load_state_dict()s into the model, which fails on ZeRO-3's
        # partitioned parameters (and is only logged); transformers' loads the DeepSpeed checkpoint.
        if self.is_deepspeed_enabled:
            Trainer._load_best_model(self)
        else:
            super()._load_best_model()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """The evaluation loss: the same objective over the gathered global eval batch, no parameter gradient.

        Training never comes here (``training_step`` runs the cached step). The
        Trainer calls this under ``no_grad``; the objective differentiates
        itself with respect to the embeddings, so grad is re-enabled for it
        while the encoder still runs without grad.
        """
        backend = self.backend(model)
        with torch.enable_grad():
            out = self.cached_step.evaluate(inputs, backend, self.state.global_step)
        loss = self.track(out.metrics, backend.device)
        return (loss, {}) if return_outputs else loss

    def track(self, metrics: dict[str, float], device: torch.device) -> torch.Tensor:
        """Hand the step's metrics to sentence-transformers' per-log averaging; return the loss as a tensor.

        A value that is not finite (the hardest-negative similarity of a batch
        where every negative was masked) is left out rather than averaged into NaN.
        """
        self.track_loss_components({k: torch.tensor(float(v), device=device) for k, v in metrics.items()
                                    if k != "loss" and math.isfinite(v)})
        return torch.tensor(metrics["loss"], device=device)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write a model ``SentenceTransformer(path)`` loads, consolidated under ZeRO-3.

        Collective (the Trainer calls it on every rank). sentence-transformers'
        ``_save`` writes ``self.model`` on whichever rank calls it and ignores
        the consolidated state dict the Trainer passes it: under ZeRO-3 that
        would save each rank's empty parameter slices, under DDP every rank
        would rewrite the same files at once. Here the parameters are gathered
        (ZeRO-3) for the write, only the saving rank writes, and its failure
        is raised on every rank. LoRA adapters are merged into the saved
        model (or, with ``save_adapter_only``, written alone), except in the
        Trainer's checkpoints, which keep them as they are to resume from.
        """
        output_dir = output_dir or self.args.output_dir
        zero3 = any(hasattr(p, "ds_id") for p in self.model.parameters())  # also partitioned at load, before any engine
        weights = "as_is" if _internal_call else "adapter" if self.save_adapter_only else "merged"
        save_consolidated(self.model, zero3, self.args.should_save, lambda: self._save(output_dir), output_dir,
                          weights)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


def check_arguments(args: SentenceTransformerTrainingArguments) -> None:
    """Refuse training arguments the exact step cannot honour, naming the argument."""
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}: ContrastiveTrainer's global batch "
            "is one step's negatives; accumulating steps would change the loss. Raise "
            "per_device_train_batch_size instead (memory is set by chunk_tokens, not by the batch)")
    if args.fp16 or getattr(args, "mixed_precision", None) == "fp16":  # accelerate can set it without fp16=True
        raise ValueError("fp16 is not supported (loss scaling of the cached gradient); use bf16")
    checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
    options = (getattr(args, "activation_checkpointing_kwargs", None)
               or getattr(args, "gradient_checkpointing_kwargs", None) or {})
    if checkpointing and isinstance(options, dict) and options.get("use_reentrant"):
        raise ValueError("gradient checkpointing with use_reentrant=True is not supported by the cached step (a "
                         "chunk's inputs need no gradient, so reentrant checkpoints give their layers none); leave "
                         "use_reentrant unset or False: non-reentrant checkpointing is exact")


def dataset_columns(dataset: Any, name: str) -> list[str]:
    """The columns of a train/eval dataset: anchor, positive, then hard negatives; refuse what cannot train."""
    if isinstance(dataset, dict):
        raise TypeError(
            f"{name}_dataset is a dict of datasets: ContrastiveTrainer trains on one dataset (a global batch "
            "must come from one dataset on every rank); concatenate them or train one at a time")
    columns = list(getattr(dataset, "column_names", None) or [])
    if len(columns) < 2:
        raise ValueError(f"{name}_dataset needs an anchor and a positive column, got columns {columns}")
    reserved = [c for c in columns if c in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(
            f"{name}_dataset has column(s) {reserved}: contrastive losses take (anchor, positive, negatives...) "
            "text columns only; remove labels/scores with dataset.remove_columns")
    return columns
