"""ContrastiveEngine: one exact, cached, cross-rank contrastive step on DeepSpeed.

One ``train_step`` is one optimizer step over one global batch (every rank's
shard). The step, in order:

1. validate and tokenize this rank's raw strings; plan length-sorted chunks;
   agree with the other ranks on errors, shard sizes and the chunk count;
2. pass 1: embed every chunk without grad, each under its own RNG seed;
3. gather every rank's embeddings and text hashes;
4. the loss of this rank's anchor rows against all global candidates (tiled),
   and its gradient with respect to every global embedding, summed back to
   the rank that owns each embedding;
5. pass 2: re-embed each chunk under the same seed (same dropout) and
   back-propagate the cached gradient through ``dot(embedding, grad)``, with
   one gradient reduction for all chunks;
6. one ``engine.step()``.

Why the gradient is exact: after step 4 every rank holds
G_r = dL/dE_r for its own embeddings E_r, where L is the mean loss of the whole
global batch. Backpropagating ``W * dot(E_r(theta), G_r)`` gives
``W * dL_r/dtheta`` on rank r, with sum_r dL_r/dtheta = dL/dtheta; DeepSpeed's
all-reduce averages over the W ranks, so every rank ends with dL/dtheta.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .batch import BatchError, Shard, Tokenized, text_hashes, tokenize, tokenizer_settings, validate_shard
from .chunking import ChunkPlan, balance_chunk_count, chunk_seed, plan_chunks
from .distributed import all_gather_objects, gather_rows, init_process_group, sum_scalars, sum_to_owners, world
from .ds_config import load_ds_config, precision, resolve_ds_config, zero_stage
from .losses import InfoNCE
from .matryoshka import Matryoshka
from .module import EmbeddingModule

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def by_row(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """Column-after-column values [C * rows, ...] -> [rows, C, ...] (one row per example)."""
    return flat.view(-1, rows, *flat.shape[1:]).transpose(0, 1).contiguous()


def default_param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and the logit scale are not decayed."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ContrastiveEngine:
    """Train a SentenceTransformer contrastively on DeepSpeed with exact large-batch gradients.

    Args:
        model: a ``SentenceTransformer`` (transformer + pooling (+ normalize)).
        loss: the contrastive loss: :class:`~ds_contrastive.InfoNCE`,
            :class:`~ds_contrastive.GuidedInfoNCE` (its guide runs in pass 1,
            outside DeepSpeed) or :class:`~ds_contrastive.Matryoshka` of either.
        ds_config: DeepSpeed config path or dict. Its batch-size keys are
            fixed by the engine (see :func:`~ds_contrastive.ds_config.resolve_ds_config`).
        chunk_tokens: padded-token budget of one encoder forward call.
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
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: InfoNCE | Matryoshka | None = None,
        ds_config: str | Path | dict[str, Any] = "configs/deepspeed/zero2.json",
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
    ) -> None:
        import deepspeed

        init_process_group()
        self.rank, self.world_size = world()
        self.loss = loss or InfoNCE()
        self.config = resolve_ds_config(load_ds_config(ds_config), self.world_size)
        plan_chunks([1], chunk_tokens, chunk_rows)  # validates the budget values before any work
        self.chunk_tokens, self.chunk_rows = chunk_tokens, chunk_rows
        self.anchor_column, self.positive_column = anchor_column, positive_column
        self.seed = seed
        self.max_length, self.lowercase = tokenizer_settings(model, max_length)
        self.tokenizer = model.tokenizer

        dims = getattr(self.loss, "dims", ())
        size = model.get_sentence_embedding_dimension() if hasattr(model, "get_sentence_embedding_dimension") else None
        if size and any(d > size for d in dims):
            raise ValueError(f"Matryoshka dims {dims} exceed the model's embedding size {size}")
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
        # DeepSpeed's coalesced reduction needs a ZeRO 1/2/3 optimizer; ZeRO 0
        # and the bf16 optimizer wrapper use the accumulation-boundary API.
        self.coalesce = self.zero_stage in (1, 2, 3) and hasattr(self.engine.optimizer, "_coalesce_grad_reduction")
        # A guided loss's guide stays outside deepspeed.initialize: never wrapped, never partitioned.
        self.guide = getattr(self.loss, "guide_model", None)
        if self.guide is not None:
            self.guide.to(self.device)
        self.global_step = 0
        self.last_plan: ChunkPlan | None = None

    # --- the step -----------------------------------------------------------------

    def train_step(self, batch: Mapping[str, list[str]]) -> dict[str, float]:
        """One optimizer step on the global batch made of every rank's ``batch``.

        ``batch`` maps column names to lists of raw strings (this rank's
        shard). Returns metrics of the whole global batch (equal on every rank),
        plus this rank's own times, throughput and peak memory.
        """
        start = time.perf_counter()
        self.engine.train()
        shard, tokens, plan, counts = self._prepare(batch)
        self.last_plan = plan
        t_prepared = time.perf_counter()

        texts = shard.flat()
        local, scale = self._pass1(tokens, plan, shard.rows, len(shard.columns))
        t_pass1 = time.perf_counter()
        guide = self.guide.embed(texts) if self.guide is not None else None
        t_guide = time.perf_counter()

        offset = sum(counts[: self.rank])
        embeddings = gather_rows(local, counts)
        hashes = gather_rows(by_row(text_hashes(texts).to(self.device), shard.rows), counts)
        if guide is not None:
            guide = gather_rows(by_row(guide, shard.rows), counts)
        result = self.loss.compute(embeddings, hashes, offset, shard.rows, scale, guide)
        grad = sum_to_owners(result.grad, counts)
        t_loss = time.perf_counter()

        self._pass2(tokens, plan, grad, result.grad_scale)
        # DeepSpeed reports the gradient norm only for its own optimizers (ZeRO 1-3, bf16 wrapper).
        own_norm = self._grad_norm() if self.zero_stage == 0 else None
        self.engine.step()
        self.global_step += 1
        end = time.perf_counter()

        lengths = tokens.lengths
        padded = sum(len(c.indices) * max(lengths[i] for i in c.indices) for c in plan.chunks if not c.dummy)
        n = sum(counts)
        keys = sorted(result.sums)
        *sums, real_tokens, pad_tokens = sum_scalars([result.sums[k] for k in keys] + [sum(lengths), padded],
                                                     self.device)
        seconds = end - start
        return {
            **self.loss.summarize(dict(zip(keys, sums)), n),
            "temperature": 1.0 / scale,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float(self.engine.get_global_grad_norm() or own_norm or 0.0),
            "global_batch_size": float(n),
            "samples_per_second": n / seconds,
            "tokens_per_second": real_tokens / seconds,
            "padding_fraction": 1.0 - real_tokens / pad_tokens,
            "chunks": float(len(plan)),
            "time_prepare": t_prepared - start,
            "time_pass1": t_pass1 - t_prepared,
            "time_guide": t_guide - t_pass1,
            "time_gather_loss": t_loss - t_guide,
            "time_pass2_step": end - t_loss,
            "peak_memory_gb": self._peak_memory_gb(),
        }

    def _prepare(self, batch: Mapping[str, list[str]]) -> tuple[Shard, Tokenized, ChunkPlan, list[int]]:
        """Validate, tokenize and plan locally; then agree with every rank or fail on every rank."""
        error, shard, tokens, plan = None, None, None, None
        try:
            shard = validate_shard(batch, self.anchor_column, self.positive_column)
            tokens = tokenize(self.tokenizer, shard.flat(), self.max_length, self.lowercase)
            plan = plan_chunks(tokens.lengths, self.chunk_tokens, self.chunk_rows)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = str(e) if isinstance(e, BatchError) else f"{type(e).__name__}: {e}"
        info = {
            "error": error,
            "columns": shard.columns if shard else None,
            "rows": shard.rows if shard else 0,
            "chunks": len(plan) if plan else 0,
        }
        infos = all_gather_objects(info)
        errors = [f"rank {r}: {i['error']}" for r, i in enumerate(infos) if i["error"]]
        if errors:
            raise BatchError("bad batch: " + "; ".join(errors))
        if any(i["columns"] != infos[0]["columns"] for i in infos):
            found = ", ".join(f"rank {r}: {i['columns']}" for r, i in enumerate(infos))
            raise BatchError(f"bad batch: ranks have different columns ({found})")
        counts = [i["rows"] for i in infos]
        return shard, tokens, balance_chunk_count(plan, max(i["chunks"] for i in infos)), counts

    @contextlib.contextmanager
    def _seeded(self, chunk: int) -> Iterator[None]:
        """Run one chunk's forward under its own seed; the global RNG stream is left as it was."""
        seed = chunk_seed(self.seed, self.global_step, self.rank, chunk)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.default_generator.manual_seed(seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)  # this rank's device only; fork_rng restores it
            yield

    def _pass1(self, tokens: Tokenized, plan: ChunkPlan, rows: int, columns: int) -> tuple[torch.Tensor, float]:
        """Embeddings of every sequence, without grad: [rows, columns, dim] in fp32, and the scale."""
        flat: torch.Tensor | None = None
        scale = 1.0 / self.loss.temperature
        with torch.no_grad():
            for c, chunk in enumerate(plan.chunks):
                with self._seeded(c):
                    emb, learned_scale = self.engine(tokens.features(chunk.indices, self.device))
                if learned_scale is not None:
                    scale = float(learned_scale)
                if chunk.dummy:
                    continue
                if flat is None:
                    flat = emb.new_empty((rows * columns, emb.shape[-1]), dtype=torch.float32)
                flat[list(chunk.indices)] = emb.float()
        return by_row(flat, rows), scale

    def _pass2(self, tokens: Tokenized, plan: ChunkPlan, grad: torch.Tensor, grad_scale: float) -> None:
        """Re-embed each chunk with grad and back-propagate the cached gradient, one reduction in all."""
        flat_grad = grad.transpose(0, 1).reshape(-1, grad.shape[-1]) * self.world_size
        reduction = self.engine.coalesce_grad_reduction() if self.coalesce else contextlib.nullcontext()
        with reduction:
            for c, chunk in enumerate(plan.chunks):
                if not self.coalesce:
                    self.engine.set_gradient_accumulation_boundary(c == len(plan) - 1)
                with self._seeded(c):
                    emb, learned_scale = self.engine(tokens.features(chunk.indices, self.device))
                g = torch.zeros_like(emb, dtype=torch.float32) if chunk.dummy else flat_grad[list(chunk.indices)]
                surrogate = (emb.float() * g).sum()
                if learned_scale is not None and c == 0:
                    surrogate = surrogate + learned_scale * (grad_scale * self.world_size)
                self.engine.backward(surrogate)

    def _grad_norm(self) -> float:
        """L2 norm of the (already all-reduced) gradients of a ZeRO-0 engine."""
        grads = [p.grad.float().norm() for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    def _peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak / 2**30

    # --- saving ---------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the model so that ``SentenceTransformer(path)`` loads it (ZeRO-3: consolidated).

        Collective: every rank must call it. Rank 0 writes; a failure there is raised on every rank.
        Under ZeRO-3 every rank gathers the full parameters for the duration of the save.
        """
        import deepspeed

        path = Path(path)
        info = {"temperature": self.temperature(), "global_step": self.global_step}  # collective under ZeRO-3
        gathered = (
            deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
            if self.zero_stage == 3
            else contextlib.nullcontext()
        )
        error = None
        with gathered:
            if self.rank == 0:
                try:
                    self.module.model.save(str(path))
                    (path / "ds_contrastive.json").write_text(json.dumps(info, indent=2) + "\n")
                except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                    error = f"saving to {path} failed on rank 0: {type(e).__name__}: {e}"
        error = all_gather_objects(error)[0]  # the other ranks learn of a failure instead of waiting
        if error:
            raise OSError(error)

    def temperature(self) -> float:
        """The current temperature (the learnable one if it is learned)."""
        log_scale = self.module.log_scale
        if log_scale is None:
            return self.loss.temperature
        import deepspeed

        with deepspeed.zero.GatheredParameters([log_scale]) if self.zero_stage == 3 else contextlib.nullcontext():
            return 1.0 / float(log_scale.detach().float().exp().clamp(max=self.loss.max_scale))
