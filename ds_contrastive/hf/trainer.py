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

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from transformers import Trainer

from ..core.backends import Backend, DeepSpeedBackend, TorchBackend, sentence_embedding
from ..core.chunks import ChunkCosts
from ..core.collectives import all_gather_objects
from ..core.embedding_module import attach_log_scale, logit_scale
from ..core.runtime import skip_shm_comm_op, world
from ..core.shard import tokenizer_settings
from ..core.step import CachedStep
from ..losses.infonce import InfoNCE
from ..losses.matryoshka import check_dims
from ..run.adapters import lora_layers
from ..run.checkpoint import weights_only_loads
from ..run.saving import save_consolidated
from .batches import AtLeastRows, GlobalBatchLoader, RankShare
from .inputs import (
    Objective,
    RawTextCollator,
    as_dataset_dict,
    check_arguments,
    check_prompts,
    learned_temperature,
    named_columns,
    objective_of,
)

skip_shm_comm_op()




class ContrastiveObjective(nn.Module):
    """The Trainer's ``loss`` module: the model (whose parameters the optimizer takes) and the objective.

    sentence-transformers builds the optimizer from ``trainer.loss``'s
    parameters and moves the loss to the device, so the Trainer needs an
    ``nn.Module`` holding the model. The objective itself (InfoNCE, guided,
    Matryoshka) runs in :class:`ContrastiveTrainer`'s training step, never
    through ``forward``.
    """

    def __init__(self, model: SentenceTransformer, objective: Objective | dict[str, Objective]) -> None:
        super().__init__()
        self.model = model
        self.objective = objective  # plain objects: a guide stays out of the optimizer and off ZeRO

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "ContrastiveObjective is run by ContrastiveTrainer's training step (cached, gathered), not called "
            "directly; use ContrastiveTrainer, or a sentence-transformers loss with SentenceTransformerTrainer")


class ContrastiveTrainer(SentenceTransformerTrainer):
    """A ``SentenceTransformerTrainer`` whose step is ds_contrastive's exact cached, gathered step.

    The global batch is ``per_device_train_batch_size x world size``; its loss
    and gradient are those of one full batch, whatever ``chunk_tokens`` /
    ``chunk_rows`` cut it into. It is drawn alike on every rank and each rank
    embeds its share (:mod:`~ds_contrastive.hf.batches`). Column convention as in sentence-transformers:
    the first column is the anchor, the second the positive, every further
    column a hard negative; a ``label`` or ``score`` column is refused.

    Several datasets, as sentence-transformers takes them: a ``DatasetDict``
    (or dict of datasets) as ``train_dataset``, each with its own columns and
    hard-negative count. Every global batch comes from one dataset, on every
    rank, in the order of ``args.multi_dataset_batch_sampler`` (PROPORTIONAL,
    ROUND_ROBIN, or a sampler class such as
    :class:`~ds_contrastive.hf.batches.WeightedBatchSampler`), seeded by
    ``args.seed`` and the epoch, so a resumed run continues the same sequence.
    ``loss`` and ``args.prompts`` may be dicts keyed by dataset name; each
    dataset's loss and accuracy are logged as ``<name>/loss`` (``train/<name>/loss``
    in W&B), and an ``eval_dataset`` ``DatasetDict`` gives ``eval_<name>_loss``.

    Args:
        model: the ``SentenceTransformer`` to train.
        args: ``SentenceTransformerTrainingArguments``; ``deepspeed=`` for ZeRO 0-3.
            ``gradient_accumulation_steps`` must be 1 (raise the batch size
            instead: the cache makes that free in memory) and fp16 is refused
            (use bf16).
        loss: :class:`~ds_contrastive.InfoNCE`, :class:`~ds_contrastive.GuidedInfoNCE`
            or :class:`~ds_contrastive.Matryoshka` of either, or a dict of them by
            dataset name. A learnable
            temperature's ``log_scale`` is a parameter of the SentenceTransformer
            itself (see :func:`~ds_contrastive.core.embedding_module.attach_log_scale`),
            so the Trainer's optimizer (without weight decay), DeepSpeed (ZeRO
            0-3) and its checkpoints hold it like any weight; ``save_model``
            leaves it out of the model's files and writes the temperature to
            ``ds_contrastive.json``, as :meth:`ContrastiveEngine.save` does.
            Across datasets it is one parameter: every loss learns it, from the
            same temperature, or none does.
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
                 train_dataset: Any = None, eval_dataset: Any = None,
                 loss: Objective | dict[str, Objective] | None = None, chunk_tokens: int | None = 16384,
                 chunk_rows: int | None = None, max_length: int | None = None, retain_tokens: int | str = "auto",
                 planner: str = "fastest", chunk_costs: ChunkCosts | None = None,
                 retain_memory_fraction: float = 0.5, retain_memory_gb: float | None = None,
                 save_adapter_only: bool = False, **kwargs: Any) -> None:
        if args is not None:
            check_arguments(args)
        if "data_collator" in kwargs:
            raise ValueError("ContrastiveTrainer brings its own raw-text collator; do not pass data_collator")
        loss = InfoNCE() if loss is None else loss
        train_dataset, eval_dataset = as_dataset_dict(train_dataset), as_dataset_dict(eval_dataset)
        columns = named_columns(train_dataset, eval_dataset)
        objectives = {name: objective_of(loss, name, train_dataset, eval_dataset) for name in columns}
        for objective in {id(o): o for o in objectives.values()}.values():
            check_dims(model, objective)
        learned = learned_temperature(list(objectives.values()))
        if save_adapter_only and not lora_layers(model):
            raise ValueError("save_adapter_only needs a model with LoRA adapters (peft)")
        if args is not None and args.prompts:
            check_prompts(args.prompts, model, [name for name in columns if name is not None])
        if learned is not None:  # before the optimizer is built from the model's parameters
            attach_log_scale(model, learned.initial_log_scale(), learned.max_scale)
        elif "log_scale" in model._parameters:
            raise ValueError("the model carries a learnable temperature (log_scale) from an earlier ContrastiveTrainer "
                             "but this loss's temperature is fixed: pass learnable_temperature=True to train it on, "
                             "or ds_contrastive.core.embedding_module.detach_log_scale(model) first")
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         loss=ContrastiveObjective(model, loss),
                         data_collator=RawTextCollator(args.prompts if args is not None else None), **kwargs)
        check_arguments(self.args)
        length, lowercase = tokenizer_settings(model, max_length)
        # one step per dataset (None: a single Dataset): its loss and its columns; the encoder is shared
        self.steps = {name: CachedStep(
            objectives[name], model.tokenizer, max_length=length, lowercase=lowercase, chunk_tokens=chunk_tokens,
            chunk_rows=chunk_rows, anchor_column=cols[0], positive_column=cols[1], seed=self.args.seed,
            retain_tokens=retain_tokens, planner=planner, chunk_costs=chunk_costs,
            retain_memory_fraction=retain_memory_fraction, retain_memory_gb=retain_memory_gb)
            for name, cols in columns.items()}
        for step in self.steps.values():
            if step.guide is not None:
                step.guide.to(self.args.device)
        self.learned = learned
        self.dataset_metrics = DatasetMetrics()
        self.deepspeed_grad_norm: float | None = None
        self.save_adapter_only = save_adapter_only

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; DeepSpeed checkpoints it resumes from are read with ``weights_only=True``.

        (``resume_from_checkpoint=`` and ``load_best_model_at_end`` load them
        through DeepSpeed, which would otherwise unpickle them unrestricted.)
        """
        self.dataset_metrics = DatasetMetrics()  # nothing left from an earlier train()
        with weights_only_loads():
            return super().train(*args, **kwargs)

    def step_of(self, dataset: str | None) -> CachedStep:
        """The step of a batch from ``dataset`` (``None``: a single Dataset); an unknown one is named."""
        if dataset not in self.steps:
            raise ValueError(f"a batch from dataset {dataset!r}, which this ContrastiveTrainer was not built with "
                             f"(its datasets: {[name for name in self.steps]}); pass it as train_dataset or "
                             "eval_dataset when creating the trainer")
        return self.steps[dataset]

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
        dataset = inputs.pop("dataset_name", None)
        if dataset is not None:
            check_same_dataset(dataset)
        out = self.step_of(dataset).forward_backward(inputs, backend, self.state.global_step)
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
        if dataset is not None:
            self.dataset_metrics.add(dataset, metrics)
        return self.track(metrics, backend.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with each dataset's own training (``<name>/loss``) and evaluation metrics.

        Also the gradient norm DeepSpeed leaves out at ZeRO-0. A ``DatasetDict``
        eval logs ``eval_<name>_loss`` (the Trainer's per-dataset evaluation) and
        here ``eval_<name>_accuracy`` and the other step metrics beside it.
        """
        if "loss" in logs:
            logs = {**logs, **self.dataset_metrics.means()}
            if logs.get("grad_norm") is None and self.deepspeed_grad_norm is not None:
                logs["grad_norm"] = self.deepspeed_grad_norm
        evaluated = [name for name in self.steps if name is not None and f"eval_{name}_loss" in logs]
        if evaluated:  # sentence-transformers only averages its eval components under a plain "eval_loss"
            logs = {**logs, **eval_means(self.accum_loss_components["eval"], f"eval_{evaluated[0]}_")}
        super().log(logs, start_time)

    @property
    def log_scale(self) -> nn.Parameter | None:
        """The learnable temperature's log logit-scale, a parameter of the model; ``None`` for a fixed temperature."""
        return self.model._parameters.get("log_scale") if self.learned is not None else None

    def temperature(self, dataset: str | None = None) -> float:
        """The current temperature (the learned one if it is learnable); its parameter must be whole (ZeRO-3).

        ``dataset``: whose fixed temperature (default: the first dataset's).
        """
        if self.log_scale is not None:
            return 1.0 / float(logit_scale(self.log_scale.detach(), self.learned.max_scale))
        return self.steps[dataset if dataset in self.steps else next(iter(self.steps))].loss.temperature

    def get_train_dataloader(self) -> DataLoader:
        """Global batches drawn alike on every rank, each rank reading its share (see :mod:`.batches`).

        sentence-transformers' ``batch_sampler`` and ``multi_dataset_batch_sampler``
        choose the batches, at the global batch size; a ``DatasetDict`` gives
        every global batch from one dataset. (An ``IterableDataset`` keeps the
        Trainer's own loader.)
        """
        dataset = self.train_dataset
        if not isinstance(dataset, (Dataset, DatasetDict)):
            return super().get_train_dataloader()
        rank, ranks = world()
        seed = self.args.seed or 0
        generator = torch.Generator().manual_seed(seed)
        parts = list(dataset.values()) if isinstance(dataset, DatasetDict) else [dataset]
        if not all(isinstance(part, Dataset) for part in parts):
            raise ValueError("a DatasetDict of ContrastiveTrainer holds Datasets (not IterableDatasets): each global "
                             "batch is drawn from one dataset's rows by index")
        sizes = all_gather_objects([len(part) for part in parts])
        if any(s != sizes[0] for s in sizes):  # the ranks would draw different batches, and different numbers
            raise ValueError(f"the ranks' training datasets differ in size ({sizes}, by rank): every rank must load "
                             "the same data")
        samplers = [AtLeastRows(self.get_batch_sampler(
            part, batch_size=self.args.train_batch_size * ranks, drop_last=self.args.dataloader_drop_last,
            valid_label_columns=self.data_collator.valid_label_columns, generator=generator, seed=self.args.seed),
            len(part), ranks) for part in parts]
        if isinstance(dataset, DatasetDict):
            dataset = ConcatDataset(parts)
            sampler = self.get_multi_dataset_batch_sampler(dataset, samplers, generator, self.args.seed)
        else:
            sampler = samplers[0]
        workers = self.args.dataloader_num_workers
        return GlobalBatchLoader(
            dataset, batch_sampler=RankShare(sampler, rank, ranks, generator, seed), collate_fn=self.data_collator,
            num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None)

    def should_dataset_name_column_be_added(self, dataset: Any, args: Any, loss: Any) -> bool:
        """Every dataset of a ``DatasetDict`` names itself in its batches: each has its own columns and step."""
        return isinstance(dataset, (DatasetDict, IterableDatasetDict))

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's decayed parameters, less the learnable log_scale (never decayed, as in the engine)."""
        return [n for n in super().get_decay_parameter_names(model) if n.split(".")[-1] != "log_scale"]

    def _load_from_checkpoint(self, checkpoint_path: str) -> None:
        # Without DeepSpeed a checkpoint is the saved SentenceTransformer, which has no log_scale (its save leaves
        # the root's own parameter out): sentence-transformers' strict load_state_dict() is run without it, and
        # its value comes from the checkpoint's ds_contrastive.json.
        log_scale = self.log_scale
        if log_scale is None:
            return super()._load_from_checkpoint(checkpoint_path)
        params = self.model._parameters
        info_path = Path(checkpoint_path) / "ds_contrastive.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if "log_scale" not in info:
            raise ValueError(f"{checkpoint_path} holds no learned temperature ({info_path} with 'log_scale'): it was "
                             "not written by a ContrastiveTrainer with a learnable temperature")
        del params["log_scale"]
        try:
            super()._load_from_checkpoint(checkpoint_path)
        finally:
            params["log_scale"] = log_scale
        with torch.no_grad():
            log_scale.fill_(info["log_scale"])

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
        dataset = inputs.pop("dataset_name", None)
        with torch.enable_grad():
            out = self.step_of(dataset).evaluate(inputs, backend, self.state.global_step)
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

        def write() -> None:  # the learnable log_scale is among the parameters gathered whole here
            self._save(output_dir)
            info = {"temperature": self.temperature(), "global_step": self.state.global_step}
            if len(self.steps) > 1:
                info["temperatures"] = {str(name): self.temperature(name) for name in self.steps}
            if self.log_scale is not None:  # exact, for resuming a checkpoint without DeepSpeed
                info["log_scale"] = float(self.log_scale.detach()[0])
            (Path(output_dir) / "ds_contrastive.json").write_text(json.dumps(info, indent=2) + "\n")

        save_consolidated(self.model, zero3, self.args.should_save, write, output_dir, weights)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


def check_same_dataset(name: str) -> None:
    """Raise on every rank if the ranks' shards of this step come from different datasets (one negatives pool)."""
    names = all_gather_objects(name)
    if len(set(names)) > 1:
        raise RuntimeError(f"one step's shards come from different datasets on different ranks ({names}): a global "
                           "batch must come from one dataset; ContrastiveTrainer's train dataloader draws it so")


class DatasetMetrics:
    """Each dataset's training loss and accuracy, averaged over the steps it had since the last log."""

    KEYS = ("loss", "accuracy")

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = {}

    def add(self, dataset: str, metrics: dict[str, float]) -> None:
        """Add one step's values; a non-finite one (a skipped step) is left out, as the Trainer's logs leave it."""
        sums = self.sums.setdefault(dataset, {})
        for key in self.KEYS:
            if math.isfinite(metrics[key]):
                total, steps = sums.get(key, (0.0, 0))
                sums[key] = (total + metrics[key], steps + 1)

    def means(self) -> dict[str, float]:
        """``{"<dataset>/loss": ..., "<dataset>/accuracy": ...}`` since the last call (the Trainer logs them as train/...)."""
        means = {f"{name}/{key}": round(total / steps, 4) for name, sums in self.sums.items()
                 for key, (total, steps) in sums.items()}
        self.sums.clear()
        return means


def eval_means(components: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """The eval step metrics sentence-transformers accumulated, averaged, under ``prefix`` (and reset).

    The step's metrics are already sums over ranks, the same on every rank, so no gather is needed.
    """
    steps = float(components.pop("steps", 0))
    means = {f"{prefix}{key}": round(float(value) / steps, 4) for key, value in components.items() if steps}
    components.clear()
    return means
