"""The cached, gathered contrastive step, independent of what wraps the model.

One call of :meth:`CachedStep.forward_backward` on every rank computes, on
each rank, the gradient of the mean loss of the *global* batch (every rank's
shard) and leaves it, reduced once, wherever the backend keeps gradients:

1. validate and tokenize this rank's raw strings; plan length-sorted chunks;
   agree with the other ranks on errors, shard sizes and the chunk count;
2. pass 1: embed every chunk without grad, each under its own RNG seed;
3. gather every rank's embeddings and text hashes (and the guide's embeddings);
4. the loss of this rank's anchor rows against all global candidates (tiled),
   and its gradient with respect to every global embedding, summed back to
   the rank that owns each embedding;
5. pass 2: re-embed each chunk under the same seed (same dropout) and
   back-propagate the cached gradient through ``dot(embedding, grad)``, with
   one gradient reduction for all chunks.

The optimizer step is the caller's (the :class:`~ds_contrastive.ContrastiveEngine`
or the Hugging Face trainer).

Why the gradient is exact: after step 4 every rank holds G_r = dL/dE_r for its
own embeddings E_r, where L is the mean loss of the whole global batch.
Backpropagating ``W * dot(E_r(theta), G_r)`` gives ``W * dL_r/dtheta`` on rank
r, with sum_r dL_r/dtheta = dL/dtheta; the data-parallel reduction averages
over the W ranks, so every rank ends with dL/dtheta.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .backends import Backend
from .batch import BatchError, Shard, Tokenized, text_hashes, tokenize, validate_shard
from .chunking import ChunkPlan, balance_chunk_count, chunk_seed, plan_chunks
from .distributed import all_gather_objects, gather_rows, sum_scalars, sum_to_owners, world
from .losses import InfoNCE
from .matryoshka import Matryoshka


def by_row(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """Column-after-column values [C * rows, ...] -> [rows, C, ...] (one row per example)."""
    return flat.view(-1, rows, *flat.shape[1:]).transpose(0, 1).contiguous()


def check_dims(model: object, loss: InfoNCE | Matryoshka) -> None:
    """Refuse Matryoshka sizes larger than the model's embedding."""
    dims = getattr(loss, "dims", ())
    size = model.get_sentence_embedding_dimension() if hasattr(model, "get_sentence_embedding_dimension") else None
    if size and any(d > size for d in dims):
        raise ValueError(f"Matryoshka dims {dims} exceed the model's embedding size {size}")


@dataclass
class StepOutput:
    """What one step measured, summed over ranks (``times`` are this rank's own)."""

    metrics: dict[str, float]
    scale: float
    plan: ChunkPlan
    global_batch_size: int
    real_tokens: float
    padded_tokens: float
    times: dict[str, float]

    def report(self, seconds: float, device: torch.device) -> dict[str, float]:
        """The loss metrics, temperature, throughput over ``seconds``, phase times and peak memory."""
        return {
            **self.metrics,
            "temperature": 1.0 / self.scale,
            "global_batch_size": float(self.global_batch_size),
            "samples_per_second": self.global_batch_size / seconds,
            "tokens_per_second": self.real_tokens / seconds,
            "padding_fraction": 1.0 - self.real_tokens / self.padded_tokens,
            "chunks": float(len(self.plan)),
            **self.times,
            "peak_memory_gb": peak_memory_gb(device),
        }


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory of this process (CPU: peak resident set size), GiB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak / 2**30


class CachedStep:
    """The exact cached step of one global batch, for any :class:`~ds_contrastive.backends.Backend`.

    Args:
        loss: :class:`~ds_contrastive.InfoNCE`, :class:`~ds_contrastive.GuidedInfoNCE`
            or :class:`~ds_contrastive.Matryoshka` of either.
        tokenizer, max_length, lowercase: how raw strings become ids (the
            model's own tokenizer and settings).
        chunk_tokens, chunk_rows: padded-token budget and row limit of one forward call.
        anchor_column, positive_column: the batch's columns of those roles;
            every other column is a hard-negative column.
        seed: base of the per-chunk dropout seeds.
    """

    def __init__(self, loss: InfoNCE | Matryoshka, tokenizer: object, max_length: int, lowercase: bool,
                 chunk_tokens: int | None, chunk_rows: int | None, anchor_column: str, positive_column: str,
                 seed: int) -> None:
        plan_chunks([1], chunk_tokens, chunk_rows)  # validates the budget values before any work
        self.loss = loss
        self.tokenizer, self.max_length, self.lowercase = tokenizer, max_length, lowercase
        self.chunk_tokens, self.chunk_rows = chunk_tokens, chunk_rows
        self.anchor_column, self.positive_column = anchor_column, positive_column
        self.seed = seed
        # A guided loss's guide stays outside every wrapper: never partitioned, never trained.
        self.guide = getattr(loss, "guide_model", None)

    def forward_backward(self, batch: Mapping[str, list[str]], backend: Backend, step: int) -> StepOutput:
        """Steps 1-5: leave dL/dtheta of the global batch in the backend's gradients, reduced once.

        ``step`` (the optimizer step about to be taken) selects the dropout
        seeds, so a resumed run draws the same masks.
        """
        return self._run(batch, backend, step, backward=True)

    def evaluate(self, batch: Mapping[str, list[str]], backend: Backend, step: int) -> StepOutput:
        """Steps 1-4 only: the loss metrics of the global batch; no parameter gradient.

        Collective like a training step (every rank calls it with its shard).
        The encoder runs without grad; the loss still differentiates itself
        with respect to the embeddings, which is cheap next to the encoder.
        """
        return self._run(batch, backend, step, backward=False)

    def _run(self, batch: Mapping[str, list[str]], backend: Backend, step: int, backward: bool) -> StepOutput:
        rank = world()[0]
        t0 = time.perf_counter()
        shard, tokens, plan, counts = self._prepare(batch)
        t1 = time.perf_counter()
        texts = shard.flat()
        local, scale = self._pass1(backend, tokens, plan, shard.rows, step)
        t2 = time.perf_counter()
        guide = self.guide.embed(texts) if self.guide is not None else None
        t3 = time.perf_counter()

        offset = sum(counts[:rank])
        embeddings = gather_rows(local, counts)
        hashes = gather_rows(by_row(text_hashes(texts).to(backend.device), shard.rows), counts)
        if guide is not None:
            guide = gather_rows(by_row(guide, shard.rows), counts)
        result = self.loss.compute(embeddings, hashes, offset, shard.rows, scale, guide)
        grad = sum_to_owners(result.grad, counts) if backward else None
        t4 = time.perf_counter()
        if grad is not None:
            self._pass2(backend, tokens, plan, grad, result.grad_scale, step)
        t5 = time.perf_counter()

        lengths = tokens.lengths
        padded = sum(len(c.indices) * max(lengths[i] for i in c.indices) for c in plan.chunks if not c.dummy)
        n = sum(counts)
        keys = sorted(result.sums)
        *sums, real, pad = sum_scalars([result.sums[k] for k in keys] + [sum(lengths), padded], backend.device)
        times = {"time_prepare": t1 - t0, "time_pass1": t2 - t1, "time_guide": t3 - t2,
                 "time_gather_loss": t4 - t3, "time_pass2": t5 - t4}
        return StepOutput(self.loss.summarize(dict(zip(keys, sums)), n), scale, plan, n, real, pad, times)

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
    def _seeded(self, device: torch.device, step: int, chunk: int) -> Iterator[None]:
        """Run one chunk's forward under its own seed; the global RNG stream is left as it was."""
        seed = chunk_seed(self.seed, step, world()[0], chunk)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)  # this rank's device only; fork_rng restores it
            yield

    def _pass1(self, backend: Backend, tokens: Tokenized, plan: ChunkPlan, rows: int, step: int
               ) -> tuple[torch.Tensor, float]:
        """Embeddings of every sequence, without grad: [rows, columns, dim] in fp32, and the scale."""
        flat: torch.Tensor | None = None
        scale = 1.0 / self.loss.temperature
        with torch.no_grad():
            for c, chunk in enumerate(plan.chunks):
                with self._seeded(backend.device, step, c):
                    emb, learned_scale = backend.forward(tokens.features(chunk.indices, backend.device))
                if learned_scale is not None:
                    scale = float(learned_scale)
                if chunk.dummy:
                    continue
                if flat is None:
                    flat = emb.new_empty((len(tokens.input_ids), emb.shape[-1]), dtype=torch.float32)
                flat[list(chunk.indices)] = emb.float()
        return by_row(flat, rows), scale

    def _pass2(self, backend: Backend, tokens: Tokenized, plan: ChunkPlan, grad: torch.Tensor, grad_scale: float,
               step: int) -> None:
        """Re-embed each chunk with grad and back-propagate the cached gradient, one reduction in all."""
        size = world()[1]
        flat_grad = grad.transpose(0, 1).reshape(-1, grad.shape[-1]) * size
        with backend.reduction():
            for c, chunk in enumerate(plan.chunks):
                with backend.chunk(last=c == len(plan) - 1):
                    with self._seeded(backend.device, step, c):
                        emb, learned_scale = backend.forward(tokens.features(chunk.indices, backend.device))
                    g = torch.zeros_like(emb, dtype=torch.float32) if chunk.dummy else flat_grad[list(chunk.indices)]
                    surrogate = (emb.float() * g).sum()
                    if learned_scale is not None and c == 0:
                        surrogate = surrogate + learned_scale * (grad_scale * size)
                    backend.backward(surrogate)
