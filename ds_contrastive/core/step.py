"""The cached, gathered contrastive step, independent of what wraps the model.

One call of :meth:`CachedStep.forward_backward` on every rank computes, on
each rank, the gradient of the mean loss of the *global* batch (every rank's
shard) and leaves it, reduced once, wherever the backend keeps gradients. The
numbers are the README's ("How the step works") and label the phases of
:meth:`CachedStep._run`:

1. tokenize this rank's raw strings (after validating them) and hash them;
2. plan length-sorted chunks that minimise the measured time of the two
   passes (:mod:`.chunks`, :mod:`.calibration`), and agree with the other
   ranks on errors, shard sizes and the chunk count;
3. pass 1: embed every chunk without grad (or keep its graph, where memory
   allows), each under its own RNG seed;
4. gather every rank's embeddings and text hashes (and the guide's embeddings);
5. the loss of this rank's anchor rows against all global candidates (tiled),
   and its gradient with respect to every global embedding, summed back to
   the rank that owns each embedding;
6. pass 2: re-embed each chunk under the same seed (same dropout), or take its
   kept graph, and back-propagate the cached gradient through
   ``dot(embedding, grad)``, with one gradient reduction for all chunks.
7. The optimizer step is the caller's (the :class:`~ds_contrastive.ContrastiveEngine`
   or the Hugging Face trainer).

Why the gradient is exact: after step 5 every rank holds G_r = dL/dE_r for its
own embeddings E_r, where L is the mean loss of the whole global batch.
Backpropagating ``W * dot(E_r(theta), G_r)`` gives ``W * dL_r/dtheta`` on rank
r, with sum_r dL_r/dtheta = dL/dtheta; the data-parallel reduction averages
over the W ranks, so every rank ends with dL/dtheta.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import resource
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BatchError
from ..losses.infonce import InfoNCE, LossResult
from ..losses.matryoshka import Matryoshka
from .backends import Backend
from .calibration import Calibration, calibrate, retain_budget_bytes
from .chunks import (
    ChunkCosts,
    ChunkPlan,
    balance_chunk_count,
    check_limits,
    check_planning,
    chunk_seed,
    forked_rng,
    plan_chunks,
)
from .collectives import all_gather_objects, gather_rows, min_over_ranks, sum_scalars, sum_to_owners
from .runtime import world
from .shard import Shard, Tokenized, text_hashes, to_device, tokenize, validate_shard


class CachedStep:
    """The exact cached step of one global batch, for any :class:`~ds_contrastive.core.backends.Backend`.

    Args:
        loss: :class:`~ds_contrastive.InfoNCE`, :class:`~ds_contrastive.GuidedInfoNCE`
            or :class:`~ds_contrastive.Matryoshka` of either.
        tokenizer, max_length, lowercase: how raw strings become ids (the
            model's own tokenizer and settings).
        chunk_tokens, chunk_rows: the most padded tokens and rows one forward
            call may hold: memory caps, not targets.
        anchor_column, positive_column: the batch's columns of those roles;
            every other column is a hard-negative column.
        seed: base of the per-chunk dropout seeds.
        retain_tokens: pass-1 autograd graphs kept for pass 2, which then
            back-propagates them instead of re-running their forward. ``"auto"``
            keeps as many as fit the memory budget below, by the activation
            memory the calibration measured; a number keeps chunks while their
            padded tokens fit it; 0 re-runs every chunk (GradCache's profile).
            The first chunks are kept (they hold the longest sequences); every
            rank keeps as many as the rank that can keep fewest. Exact: the kept
            graph is the very forward a re-run would repeat. It costs the
            activation memory of those chunks held through the gather and the
            loss. Under ZeRO-3 a kept chunk's backward also holds the whole
            model's parameters gathered until it ends (DeepSpeed frees a
            module's parameters after backward by a counter that every later
            forward resets).
        planner: ``"fastest"`` cuts the length-sorted sequences where the
            modelled time of the two passes is least
            (:func:`~ds_contrastive.core.chunks.plan_fastest`); ``"fill"`` fills
            every chunk up to ``chunk_tokens`` (the rule of earlier versions,
            to reproduce their runs).
        chunk_costs: the planner's time model; None measures it on this
            machine (:func:`~ds_contrastive.core.calibration.calibrate`, cached).
            Fixed costs make the plan, and so the dropout seeds, independent
            of the machine's timings.
        retain_memory_fraction, retain_memory_gb: the budget of
            ``retain_tokens="auto"``: this many GiB per rank, or by default this
            fraction of the memory free at the step's start (GPU: the device's;
            CPU: the system's available memory shared by the machine's ranks),
            less one copy of the parameters. Pass 2 runs the kept graphs'
            backwards first, then the re-run chunks, so the kept graphs and the
            largest re-run chunk are never held together (:func:`kept_within`).
    """

    def __init__(self, loss: InfoNCE | Matryoshka, tokenizer: object, *, max_length: int, lowercase: bool = False,
                 chunk_tokens: int | None, chunk_rows: int | None = None, anchor_column: str = "anchor",
                 positive_column: str = "positive", seed: int = 0, retain_tokens: int | str = "auto",
                 planner: str = "fastest", chunk_costs: ChunkCosts | None = None,
                 retain_memory_fraction: float = 0.5, retain_memory_gb: float | None = None) -> None:
        check_limits(chunk_tokens, chunk_rows)
        check_planning(planner, chunk_costs, retain_tokens, retain_memory_fraction, retain_memory_gb)
        self.loss = loss
        self.tokenizer, self.max_length, self.lowercase = tokenizer, max_length, lowercase
        self.chunk_tokens, self.chunk_rows = chunk_tokens, chunk_rows
        self.anchor_column, self.positive_column = anchor_column, positive_column
        self.seed = seed
        self.retain_tokens = retain_tokens
        self.retain_memory_fraction, self.retain_memory_gb = retain_memory_fraction, retain_memory_gb
        self.planner = planner
        self.chunk_costs = chunk_costs  # given, or measured by calibrate()
        self.calibration: Calibration | None = None
        # A fast tokenizer is not reentrant (truncation settings live in it): one prepare at a time.
        self._tokenizing = threading.Lock()
        # A guided loss's guide stays outside every wrapper: never partitioned, never trained.
        self.guide = getattr(loss, "guide_model", None)

    @property
    def costs(self) -> ChunkCosts | None:
        """The time model the planner uses (None: the ``fill`` planner, which needs none)."""
        if self.planner == "fill":
            return None
        if self.chunk_costs is None:
            raise RuntimeError("the chunk planner's costs are not measured yet: call calibrate(backend) first "
                               "(ContrastiveEngine does when it is built; a step on a raw batch does it itself)")
        return self.chunk_costs

    def needs_calibration(self) -> bool:
        """Whether :meth:`calibrate` still has something to measure."""
        wanted = (self.planner == "fastest" and self.chunk_costs is None) or self.retain_tokens == "auto"
        return wanted and self.calibration is None

    def calibrate(self, backend: Backend) -> None:
        """Measure (or read from the cache) what the planner and ``retain_tokens="auto"`` need; collective.

        Every rank must call it, before the first :meth:`prepare` of a batch
        planned by ``"fastest"``. Costs given as ``chunk_costs`` are kept.
        """
        if not self.needs_calibration():
            return
        with self._tokenizing:
            sample = self.tokenizer(CALIBRATION_TEXT, truncation=True, max_length=self.max_length)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.calibration = calibrate(backend, sample["input_ids"], self.max_length, self.chunk_tokens,
                                     self.chunk_rows, pad_id, "token_type_ids" in sample)
        if self.chunk_costs is None:
            self.chunk_costs = self.calibration.costs

    def prepare(self, batch: Mapping[str, list[str]]) -> Prepared:
        """Validate, tokenize and plan this rank's shard; local only, safe in a background thread."""
        shard, tokens, plan, hashes, error, digest = None, None, None, None, None, ""
        costs = self.costs  # outside the try: a missing calibration is the caller's error, not the batch's
        try:
            shard = validate_shard(batch, self.anchor_column, self.positive_column)
            with self._tokenizing:
                tokens = tokenize(self.tokenizer, shard.flat(), self.max_length, self.lowercase)
            plan = plan_chunks(tokens.lengths, self.chunk_tokens, self.chunk_rows, costs)
            hashes = by_row(text_hashes(shard.flat()), shard.rows)
            digest = shard_digest(hashes)
        except Exception as e:  # noqa: BLE001 - agreed on and raised on every rank in _agree
            error = str(e) if isinstance(e, BatchError) else f"{type(e).__name__}: {e}"
        return Prepared(shard, tokens, plan, hashes, error, self._settings(), digest)

    def replan(self, prepared: Prepared) -> Prepared:
        """A batch prepared elsewhere (another process, before this step's calibration) planned as this step plans.

        The tokens, hashes and digest stay; only the plan (and the settings it
        is checked against) change. The tokenizer settings must be this step's.
        """
        if prepared.settings[:TOKENIZATION_SETTINGS] != self._settings()[:TOKENIZATION_SETTINGS]:
            raise ValueError("replan keeps the tokens: the batch must be tokenized with this step's tokenizer, "
                             "max_length, lowercasing, limits and columns")
        plan = plan_chunks(prepared.tokens.lengths, self.chunk_tokens, self.chunk_rows, self.costs)
        return dataclasses.replace(prepared, plan=plan, settings=self._settings())

    def _settings(self) -> tuple:
        """What a prepared batch depends on: a batch prepared under other settings is refused.

        The first TOKENIZATION_SETTINGS say how its texts became tokens, the rest how they were planned.
        """
        return (type(self.tokenizer).__name__, len(self.tokenizer), self.max_length, self.lowercase,
                self.chunk_tokens, self.chunk_rows, self.anchor_column, self.positive_column, self.planner,
                self.chunk_costs if self.planner == "fastest" else None)

    def forward_backward(self, batch: Mapping[str, list[str]] | Prepared, backend: Backend, step: int
                         ) -> StepOutput:
        """Steps 1-6: leave dL/dtheta of the global batch in the backend's gradients, reduced once.

        ``batch`` is this rank's raw shard, or that shard already passed
        through :meth:`prepare`. ``step`` (the optimizer step about to be
        taken) selects the dropout seeds, so a resumed run draws the same masks.
        """
        return self._run(batch, backend, step, backward=True)

    def evaluate(self, batch: Mapping[str, list[str]] | Prepared, backend: Backend, step: int) -> StepOutput:
        """Steps 1-5 only: the loss metrics of the global batch; no parameter gradient.

        Collective like a training step (every rank calls it with its shard).
        The encoder runs without grad; the loss still differentiates itself
        with respect to the embeddings, which is cheap next to the encoder.
        """
        return self._run(batch, backend, step, backward=False)

    def embed(self, batch: Mapping[str, list[str]], backend: Backend) -> tuple[torch.Tensor, list[int]]:
        """Steps 1-3 without grad: this rank's shard as [rows, columns, dim] fp32, and every rank's rows.

        For evaluation: collective like a step (shards may differ in size;
        ZeRO-3 ranks run the same number of forwards); nothing is kept for a
        backward. The caller chooses the module's mode (eval: no dropout).
        """
        self.calibrate(backend)
        prepared = self.prepare(batch)
        plan, counts, _ = self._agree(prepared)
        chunks = Chunks(plan, prepared.tokens, backend.device)
        local, _ = self._pass1(backend, chunks, prepared.shard.rows, step=0, kept=0, graphs=[])
        return local, counts

    def _run(self, batch: Mapping[str, list[str]] | Prepared, backend: Backend, step: int, backward: bool
             ) -> StepOutput:
        clock = PhaseClock()
        # 1-2. Tokenize, hash and plan (here, or in prepare() ahead of the step); agree across ranks.
        self.calibrate(backend)  # collective, once; a Prepared batch was planned after the engine's
        prepared = batch if isinstance(batch, Prepared) else self.prepare(batch)
        plan, counts, digest = self._agree(prepared)
        shard = prepared.shard
        chunks = Chunks(plan, prepared.tokens, backend.device)
        kept = self._kept_count(chunks, backend) if backward else 0
        clock.lap("time_prepare")
        graphs: list[Embedded] = []
        try:  # kept graphs hold activations: never let an exception's traceback keep them alive
            # 3. Pass 1: every chunk's embedding, no grad except the kept graphs.
            local, scale = self._pass1(backend, chunks, shard.rows, step, kept, graphs)
            clock.lap("time_pass1")
            guide = self.guide.embed(shard.flat()) if self.guide is not None else None
            clock.lap("time_guide")

            # 4. Gather every rank's embeddings and text hashes (and the guide's embeddings).
            embeddings = gather_rows(local, counts)
            hashes = gather_rows(prepared.hashes.to(backend.device), counts)
            if guide is not None:
                guide = gather_rows(by_row(guide, shard.rows), counts)
            # 5. This rank's loss rows against the global batch; d loss / d embedding back to the owning ranks.
            result = self.loss.compute(embeddings, hashes, sum(counts[:world()[0]]), shard.rows, scale, guide)
            # a non-finite loss or cached gradient on any rank: every rank skips pass 2 (no parameter gradient)
            finite = min_over_ranks(int(is_finite(result)), backend.device) == 1
            grad = sum_to_owners(result.grad, counts) if backward and finite else None
            clock.lap("time_gather_loss")

            # 6. Pass 2: back-propagate the cached gradient through each chunk, one reduction in all.
            if grad is not None:
                self._pass2(backend, chunks, graphs, grad, result.grad_scale, step)
            clock.lap("time_pass2")
        finally:
            graphs.clear()
        return self._output(result, scale, chunks, counts, kept, finite, digest, clock.times, backend.device)

    def _output(self, result: LossResult, scale: float, chunks: Chunks, counts: list[int], kept: int, finite: bool,
                digest: str, times: dict[str, float], device: torch.device) -> StepOutput:
        """The step's metrics and token counts summed over ranks (one collective)."""
        keys = sorted(result.sums)
        *sums, real, pad, truncated = sum_scalars(
            [result.sums[k] for k in keys] + [chunks.real_tokens, chunks.padded_tokens, chunks.tokens.truncated],
            device)
        n = sum(counts)
        return StepOutput(metrics=self.loss.summarize(dict(zip(keys, sums)), n), scale=scale, plan=chunks.plan,
                          global_batch_size=n, real_tokens=real, padded_tokens=pad, times=times, kept_chunks=kept,
                          finite=finite, truncated=int(truncated), batch_digest=digest)

    def _agree(self, prepared: Prepared) -> tuple[ChunkPlan, list[int], str]:
        """Agree with every rank on errors, columns, shard sizes and the chunk count, or fail on every rank.

        Returns the (count-balanced) plan, every rank's row count and the global batch's digest.
        """
        error = prepared.error
        if prepared.settings != self._settings():
            error = ("this batch was prepared by another step (different tokenizer, max_length, chunking or "
                     "columns): prepare it with this engine's prepare()")
        info = {
            "error": error,
            "retain_tokens": self.retain_tokens,
            "columns": prepared.shard.columns if prepared.shard else None,
            "rows": prepared.shard.rows if prepared.shard else 0,
            "chunks": len(prepared.plan) if prepared.plan else 0,
            "digest": prepared.digest,
        }
        infos = all_gather_objects(info)
        errors = [f"rank {r}: {i['error']}" for r, i in enumerate(infos) if i["error"]]
        if errors:
            raise BatchError("bad batch: " + "; ".join(errors))
        if len({i["retain_tokens"] for i in infos}) > 1:  # they would run different collectives
            found = ", ".join(f"rank {r}: {i['retain_tokens']}" for r, i in enumerate(infos))
            raise ValueError(f"ranks were given different retain_tokens ({found})")
        if any(i["columns"] != infos[0]["columns"] for i in infos):
            found = ", ".join(f"rank {r}: {i['columns']}" for r, i in enumerate(infos))
            raise BatchError(f"bad batch: ranks have different columns ({found})")
        counts = [i["rows"] for i in infos]
        digest = hashlib.blake2b("".join(i["digest"] for i in infos).encode(), digest_size=8).hexdigest()
        count = max(i["chunks"] for i in infos)
        return balance_chunk_count(prepared.plan, count, prepared.tokens.lengths, self.costs), counts, digest

    def _kept_count(self, chunks: Chunks, backend: Backend) -> int:
        """How many leading chunks keep their pass-1 graph: the same count on every rank.

        Under ZeRO-3 every forward and backward gathers parameters
        collectively, so ranks must run the same sequence of them. A backend
        whose last forward must open the gradient reduction (DDP) re-runs its
        last chunk.
        """
        if self.retain_tokens == 0:  # the same on every rank (agreed in _agree)
            return 0
        if self.retain_tokens == "auto":
            budget = retain_budget_bytes(backend.device, self.retain_memory_fraction, self.retain_memory_gb)
            memory = [self.calibration.graph_bytes(rows, length) for rows, length in chunks.shapes]
            kept = kept_within(memory, budget - parameter_bytes(backend.module))
        else:
            budget, kept = self.retain_tokens, 0
            for cost in chunks.sizes:
                if cost > budget:
                    break
                budget, kept = budget - cost, kept + 1
        if backend.last_forward_reduces:
            kept = min(kept, len(chunks) - 1)
        return min_over_ranks(kept, backend.device)

    @contextlib.contextmanager
    def _seeded(self, device: torch.device, step: int, chunk: int) -> Iterator[None]:
        """Run one chunk's forward under its own seed; the global RNG stream is left as it was."""
        seed = chunk_seed(self.seed, step, world()[0], chunk)
        with forked_rng(device):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)  # this rank's device only; fork_rng restores it
            yield

    def _pass1(self, backend: Backend, chunks: Chunks, rows: int, step: int, kept: int, graphs: list[Embedded]
               ) -> tuple[torch.Tensor, float]:
        """Embeddings of every sequence: [rows, columns, dim] in fp32, and the scale.

        The first ``kept`` chunks run with grad (under the backend's
        no-reduction context) and their outputs are appended to ``graphs`` for
        pass 2; the others run without grad.
        """
        outputs: list[torch.Tensor] = []
        learned = None
        for c in range(len(chunks)):
            keep = c < kept
            context = backend.chunk(last=False) if keep else contextlib.nullcontext()
            with torch.set_grad_enabled(keep), context, self._seeded(backend.device, step, c):
                emb, learned = backend.forward(chunks.features(c))
            if keep:
                graphs.append((emb, learned))
            outputs.append(emb.detach())
        scale = float(learned.detach()) if learned is not None else 1.0 / self.loss.temperature
        return by_row(chunks.unsort(outputs), rows), scale

    def _pass2(self, backend: Backend, chunks: Chunks, graphs: list[Embedded], grad: torch.Tensor,
               grad_scale: float, step: int) -> None:
        """Back-propagate the cached gradient through each chunk (kept graph or re-run), one reduction in all."""
        size = world()[1]
        grads = chunks.sort(grad.transpose(0, 1).reshape(-1, grad.shape[-1]) * size)
        with backend.reduction():
            for c in range(len(chunks)):
                with backend.chunk(last=c == len(chunks) - 1):
                    if c < len(graphs):
                        (emb, learned), graphs[c] = graphs[c], (None, None)  # freed after its backward
                    else:
                        with self._seeded(backend.device, step, c):
                            emb, learned = backend.forward(chunks.features(c))
                    surrogate = (emb.float() * grads[c]).sum()
                    # the scale's gradient rides on the last chunk, whose backward is the one DDP reduces in
                    if learned is not None and c == len(chunks) - 1:
                        surrogate = surrogate + learned * (grad_scale * size)
                    backend.backward(surrogate)


def by_row(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """Column-after-column values [C * rows, ...] -> [rows, C, ...] (one row per example)."""
    return flat.view(-1, rows, *flat.shape[1:]).transpose(0, 1).contiguous()


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
    kept_chunks: int = 0
    finite: bool = True  # False: the loss or its gradient was not finite on some rank; pass 2 did not run
    truncated: int = 0  # texts of the global batch longer than the truncation length
    batch_digest: str = ""  # identifies the global batch's texts (every rank's, in rank order)

    def report(self, seconds: float, device: torch.device) -> dict[str, float]:
        """The loss metrics, temperature, throughput over ``seconds``, phase times and peak memory."""
        return {
            **self.metrics,
            "temperature": 1.0 / self.scale,
            "global_batch_size": float(self.global_batch_size),
            "samples_per_second": self.global_batch_size / seconds,
            "tokens_per_second": self.real_tokens / seconds,
            "tokens": self.real_tokens,
            "padding_fraction": 1.0 - self.real_tokens / self.padded_tokens,
            "chunks": float(len(self.plan)),
            "kept_chunks": float(self.kept_chunks),
            "truncated_texts": float(self.truncated),
            **self.times,
            "peak_memory_gb": peak_memory_gb(device),
        }


class PhaseClock:
    """Seconds spent in each phase of a step: ``lap(name)`` closes the phase that began at the last lap."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name], self._last = now - self._last, now


def is_finite(result: LossResult) -> bool:
    """Whether this rank's loss sums, logit-scale gradient and embedding gradients are all finite."""
    values = [*result.sums.values(), result.grad_scale]
    return all(math.isfinite(v) for v in values) and bool(torch.isfinite(result.grad).all())


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory of this process (CPU: peak resident set size), GiB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak / 2**30


@dataclass
class Prepared:
    """One rank's shard validated, tokenized and cut into chunks: the local half of steps 1-2.

    Built by :meth:`CachedStep.prepare`, which touches no collective and no
    device, so the next batch can be prepared in a background thread while
    the current step runs. A bad batch is not raised here: its ``error`` is
    agreed on by every rank at the start of the step, which then fails on all
    of them alike.
    """

    shard: Shard | None
    tokens: Tokenized | None
    plan: ChunkPlan | None
    hashes: torch.Tensor | None
    error: str | None
    settings: tuple
    digest: str = ""  # of this shard's texts, column after column


def shard_digest(hashes: torch.Tensor) -> str:
    """A short digest of a shard's per-text hashes ([rows, columns]): equal shards, equal digests."""
    return hashlib.blake2b(hashes.numpy().tobytes(), digest_size=8).hexdigest()



Embedded = tuple[torch.Tensor, torch.Tensor | None]
TOKENIZATION_SETTINGS = 8  # the leading entries of CachedStep._settings() that the tokens depend on
# A real sentence, tokenized by the model's own tokenizer, whose ids (repeated) make the probe's sequences.
CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog, then measures how long an encoder takes to embed "
                    "sequences of many lengths on this machine.")


BACKWARD_SHARE = 0.25  # of a graph: the working memory of its backward (gradients, layer by layer)


def kept_within(memory: list[float], budget: float) -> int:
    """How many leading chunks of activation sizes ``memory`` can keep their graphs within ``budget`` bytes.

    Pass 2 back-propagates the kept graphs first, freeing each as it goes,
    and only then re-runs the other chunks one at a time. So the peak is the
    larger of two moments: all kept graphs plus the first one's backward, or
    the largest re-run chunk's graph plus its backward.
    """
    kept_bytes = np.cumsum([0.0, *memory])
    rerun = np.maximum.accumulate([0.0, *memory[::-1]])[::-1]  # rerun[k]: the largest of memory[k:]
    first = np.array([0.0] + [memory[0]] * len(memory)) if memory else np.zeros(1)
    peak = np.maximum(kept_bytes + BACKWARD_SHARE * first, (1 + BACKWARD_SHARE) * rerun)
    fits = peak <= budget
    return int(np.flatnonzero(fits)[-1]) if fits.any() else 0  # keeping none is the plain step


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of one full copy of the module's trainable parameters (ZeRO-3: of the unpartitioned ones)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters() if p.requires_grad)


def chunk_shapes(plan: ChunkPlan, tokens: Tokenized) -> list[tuple[int, int]]:
    """(rows, longest length) of each chunk of the plan."""
    lengths = tokens.lengths
    return [(len(c.indices), max(lengths[i] for i in c.indices)) for c in plan.chunks]


class Chunks:
    """One step's chunks: padded inputs made once for both passes, and the row order.

    The padded inputs stay on the host (page-locked on a GPU machine) and are
    copied to the device for each forward, so device memory does not grow
    with the global batch.

    Embeddings come out of the encoder chunk after chunk (length-sorted);
    :meth:`unsort` puts them back in the shard's order with one indexed copy
    and :meth:`sort` cuts a gradient in the shard's order into per-chunk
    blocks, so no per-chunk index travels to the device. Dummy chunks (which
    only keep the forward count equal across ranks) get zero gradients.
    """

    def __init__(self, plan: ChunkPlan, tokens: Tokenized, device: torch.device) -> None:
        self.plan, self.tokens, self.device = plan, tokens, device
        self._padded: dict[int, dict[str, torch.Tensor]] = {}
        real = [c for c in plan.chunks if not c.dummy]
        self._order = torch.tensor([i for c in real for i in c.indices], dtype=torch.long).to(device)
        self.shapes = chunk_shapes(plan, tokens)
        self.sizes = [rows * length for rows, length in self.shapes]  # padded tokens
        self.padded_tokens = float(sum(s for s, c in zip(self.sizes, plan.chunks) if not c.dummy))
        self.real_tokens = float(sum(tokens.lengths))

    def __len__(self) -> int:
        return len(self.plan)

    def features(self, c: int) -> dict[str, torch.Tensor]:
        """Chunk ``c``'s padded inputs on the device (padded on first use, kept on the host for pass 2)."""
        if c not in self._padded:
            self._padded[c] = self.tokens.padded(self.plan.chunks[c].indices, pin=self.device.type == "cuda")
        return to_device(self._padded[c], self.device)

    def unsort(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Per-chunk embeddings -> [sequences, dim] fp32 in the shard's order."""
        real = torch.cat([o for o, c in zip(outputs, self.plan.chunks) if not c.dummy]).float()
        flat = torch.empty_like(real)
        flat[self._order] = real
        return flat

    def sort(self, flat_grad: torch.Tensor) -> list[torch.Tensor]:
        """A gradient in the shard's order -> one block per chunk (zeros for dummy chunks)."""
        blocks = iter(flat_grad[self._order].split([len(c.indices) for c in self.plan.chunks if not c.dummy]))
        zero = flat_grad.new_zeros((1, flat_grad.shape[-1]))
        return [zero if c.dummy else next(blocks) for c in self.plan.chunks]
