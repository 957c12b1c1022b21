"""What a forward call costs on this machine, measured once and cached: the chunk planner's constants.

The planner (:func:`~ds_contrastive.core.chunks.plan_fastest`) needs the time of
one encoder call as ``call + token * rows * length + attention * rows *
length**2``, and keeping pass-1 graphs (``retain_tokens="auto"``) needs the
activation memory of a chunk. Both depend on the model, the device, the
precision and the wrapper (ZeRO-3's per-module hooks make every call dearer),
so neither is guessed: a short probe times no-grad forward calls of a few
shapes through the very wrapper that trains, and measures what one
grad-enabled forward saves for backward, in training mode (dropout on). Pass
2 is taken to cost a fixed multiple of pass 1 per chunk, which leaves the
plan unchanged since only the ratios of the constants matter. That is an
approximation: a backward costs about twice a forward per token, while some
per-call costs (ZeRO-3's parameter fetch) are paid once per call in each.

Results are cached on disk per model architecture, attention implementation,
device, precision, wrapper, world size, limits and library versions
(``$DS_CONTRASTIVE_CACHE``, default
``~/.cache/ds_contrastive/calibration.json``). Every rank takes part: under
ZeRO-3 each forward is collective, so either all ranks read the cache or all
probe, and all use rank 0's constants so that plans do not depend on which
rank measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import Backend
from .chunks import ChunkCosts, forked_rng
from .collectives import all_gather_objects, first_error
from .runtime import world
from .shard import Tokenized, to_device

CACHE_VERSION = 2
PROBE_TOKENS = 16384  # the largest probe call, in padded tokens, at most (and at most the chunk budget)
PROBE_SECONDS = 0.5  # ... and about this long
UNIT_TOKENS = 1024  # the call that sizes the probe
# each shape is called at least MIN_CALLS times and, when short, for about MIN_TIMED_SECONDS (at most MAX_CALLS);
# the fastest call counts: a busy machine only ever makes a call slower
MIN_CALLS, MAX_CALLS, MIN_TIMED_SECONDS = 2, 8, 0.2


@dataclass(frozen=True)
class Calibration:
    """The planner's time model and the activation memory one kept pass-1 graph holds.

    ``token_bytes`` and ``attention_bytes``: bytes a grad-enabled forward
    saves for backward, per padded token and per row x length**2.
    """

    costs: ChunkCosts
    token_bytes: float
    attention_bytes: float

    def graph_bytes(self, rows: int, length: int) -> float:
        """Activation memory of one kept chunk."""
        return rows * length * (self.token_bytes + self.attention_bytes * length)

    def to_json(self) -> dict[str, float]:
        return {**asdict(self.costs), "token_bytes": self.token_bytes, "attention_bytes": self.attention_bytes}

    @classmethod
    def from_json(cls, values: dict[str, float]) -> Calibration:
        costs = ChunkCosts(values["call"], values["token"], values["attention"])
        return cls(costs, float(values["token_bytes"]), float(values["attention_bytes"]))


def cache_path() -> Path:
    return Path(os.environ.get("DS_CONTRASTIVE_CACHE") or Path.home() / ".cache" / "ds_contrastive" / "calibration.json")


def fingerprint(backend: Backend, max_length: int, limits: tuple[int, int | None]) -> str:
    """What the measured constants depend on: the model, its device and wrapper, the probe's shapes, versions."""
    import deepspeed
    import transformers

    module, device = backend.module, backend.device
    shapes = [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype)) for name, p in module.named_parameters()]
    configs = [m.config for m in module.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")]
    attention = sorted({str(getattr(c, "_attn_implementation", None)) for c in configs})
    checkpointing = any(recomputes_activations(m) for m in module.modules())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    facts = [CACHE_VERSION, shapes, attention, checkpointing, where, backend.wrapper, world()[1], max_length, limits,
             torch.__version__, deepspeed.__version__, transformers.__version__]
    return hashlib.blake2b(json.dumps(facts).encode(), digest_size=12).hexdigest()


def recomputes_activations(module: torch.nn.Module) -> bool:
    """Whether a Hugging Face model has gradient (activation) checkpointing on: it changes what a forward saves."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


def read_cache(key: str) -> Calibration | None:
    """The cached calibration under ``key``; None when absent or unreadable (then it is measured again)."""
    try:
        entry = json.loads(cache_path().read_text()).get(key)
        return Calibration.from_json(entry) if entry else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(key: str, calibration: Calibration) -> None:
    """Add ``calibration`` under ``key``, atomically (a temporary file renamed into place)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        entries[key] = calibration.to_json()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as e:  # a read-only home must not stop training: it is measured again next time
        print(f"ds_contrastive: could not cache the chunk-cost calibration in {path}: {e}", flush=True)


def calibrate(backend: Backend, sample_ids: list[int], max_length: int, token_budget: int | None,
              max_rows: int | None, pad_id: int, token_types: bool) -> Calibration:
    """The calibration of this model on this device: from the cache, or measured by every rank together.

    Collective. ``sample_ids`` are a real text's token ids, repeated to make
    the probe's sequences; no probe call exceeds ``token_budget`` padded
    tokens or ``max_rows`` rows (the step's memory caps). A failure on any
    rank is raised on every rank.
    """
    limits = (min(PROBE_TOKENS, token_budget or PROBE_TOKENS), max_rows)
    key = fingerprint(backend, max_length, limits)
    cached = all_gather_objects(read_cache(key))
    if all(c is not None for c in cached):
        return cached[0]
    measured, error = None, None
    try:
        measured = Probe(backend, sample_ids, pad_id, token_types).measure(max_length, *limits)
    except Exception as e:  # noqa: BLE001 - raised on every rank below, not only here
        error = f"rank {world()[0]}: {type(e).__name__}: {e}"
    error = first_error(error)
    if error:
        raise RuntimeError(f"measuring the chunk planner's costs failed ({error}); lower chunk_tokens / chunk_rows, "
                           "or give chunk_costs and a numeric retain_tokens")
    measured = all_gather_objects(measured)[0]
    if os.environ.get("LOCAL_RANK", "0") == "0":
        write_cache(key, measured)
    return measured


class Probe:
    """Timed forward calls of synthetic sequences of chosen shapes, and the memory they save for backward."""

    def __init__(self, backend: Backend, sample_ids: list[int], pad_id: int, token_types: bool) -> None:
        self.backend, self.device = backend, backend.device
        self.sample_ids, self.pad_id, self.token_types = sample_ids, pad_id, token_types

    def features(self, rows: int, length: int) -> dict[str, torch.Tensor]:
        """``rows`` sequences of exactly ``length`` tokens: the sample text's ids, repeated, its ends kept."""
        first, middle, last = self.sample_ids[0], self.sample_ids[1:-1] or [self.pad_id + 1], self.sample_ids[-1]
        body = list(itertools.islice(itertools.cycle(middle), max(0, length - 2)))
        ids = ([first] + body + [last])[:length]
        tokens = Tokenized([ids] * rows, [[0] * len(ids)] * rows if self.token_types else None, self.pad_id)
        return to_device(tokens.padded(range(rows)), self.device)

    def measure(self, max_length: int, token_budget: int, max_rows: int | None) -> Calibration:
        """Fit the time model to no-grad calls of 1, some and many rows at three lengths; measure memory.

        In training mode (dropout costs time and saves masks), the module's
        mode restored after. The largest call is kept near PROBE_SECONDS (a
        one-thread CPU rank takes seconds for what a GPU does in
        milliseconds): a first call of about UNIT_TOKENS sizes it, within
        the limits.
        """

        def within(rows: int, length: int) -> tuple[int, int]:
            return max(1, min(rows, token_budget // length, max_rows or rows)), length

        lengths = sorted({max(2, max_length // 16), max(2, max_length // 4), max_length})
        module = self.backend.module
        training = module.training
        module.train()
        try:
            with forked_rng(self.device):  # the probe's dropout draws leave the global RNG streams as they were
                self.timed(*within(1, lengths[0]))  # warm-up: first-call allocations and kernel choices
                rows, length = within(max(1, UNIT_TOKENS // lengths[1]), lengths[1])
                # every rank sizes the probe alike (the slowest rank's unit): the same calls everywhere
                unit = max(all_gather_objects(self.timed(rows, length))) / (rows * length)
                tokens = int(min(token_budget, max(UNIT_TOKENS, PROBE_SECONDS / max(unit, 1e-12))))
                shapes = sorted({within(r, n) for n in lengths for r in (1, tokens // n // 4, tokens // n)})
                seconds = [self.timed(rows, length) for rows, length in shapes]
                memory_shapes = [within(max(1, tokens // n // 4), n) for n in (lengths[0], lengths[-1])]
                saved = [self.saved_bytes(rows, length) for rows, length in memory_shapes]
        finally:
            module.train(training)
        call, token, attention = fit_nonnegative([[1.0, r * n, r * n * n] for r, n in shapes], seconds,
                                                 relative=True)
        token_bytes, attention_bytes = fit_nonnegative([[r * n, r * n * n] for r, n in memory_shapes], saved,
                                                       relative=False)
        return Calibration(ChunkCosts(call, token, attention), token_bytes, attention_bytes)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, rows: int, length: int) -> float:
        """Seconds of one no-grad forward call of this shape: the fastest of a few, to shed the machine's noise.

        A short call is repeated; every rank repeats it alike (under ZeRO-3
        each forward is collective), as often as the slowest rank's first
        call asks.
        """
        features = self.features(rows, length)
        times = [self.call(features)]
        slowest = max(all_gather_objects(times[0]))
        repeats = min(MAX_CALLS, max(MIN_CALLS, math.ceil(MIN_TIMED_SECONDS / max(slowest, 1e-9))))
        times += [self.call(features) for _ in range(repeats - 1)]
        return min(times)

    def call(self, features: dict[str, torch.Tensor]) -> float:
        self.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            self.backend.forward(features)
        self.synchronize()
        return time.perf_counter() - start

    def saved_bytes(self, rows: int, length: int) -> float:
        """Bytes one grad-enabled forward of this shape saves for backward, parameters excluded.

        Then dropped without a backward: a wrapper that arms its gradient
        reduction at forward time (DDP) is told this call does not reduce.
        """
        features = self.features(rows, length)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in {p.untyped_storage().data_ptr() for p in self.backend.module.parameters()}:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        no_reduction = self.backend.chunk(last=False) if self.backend.last_forward_reduces else contextlib.nullcontext()
        with torch.enable_grad(), no_reduction, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            embedding, _ = self.backend.forward(features)
        del embedding  # the graph goes with it: no backward runs
        return float(sum(storages.values()))


def fit_nonnegative(rows: list[list[float]], targets: list[float], relative: bool) -> list[float]:
    """Least squares ``rows @ x ~= targets`` with ``x >= 0`` (exact for a few unknowns: every active set).

    ``relative``: minimise relative rather than absolute errors (the probe's
    times span orders of magnitude, and a small call's time matters as much
    as a large one's).
    """
    a, b = np.asarray(rows, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if relative:
        a, b = a / b[:, None], np.ones_like(b)
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    best, best_error = np.zeros(a.shape[1]), float(np.square(b).sum())
    for size in range(1, a.shape[1] + 1):
        for active in itertools.combinations(range(a.shape[1]), size):
            x, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
            if (x < 0).any():
                continue
            error = float(np.square(a[:, active] @ x - b).sum())
            if error < best_error:
                best, best_error = np.zeros(a.shape[1]), error
                best[list(active)] = x
    return (best / scale).tolist()


def retain_budget_bytes(device: torch.device, fraction: float, gigabytes: float | None) -> float:
    """Memory this rank may fill with kept pass-1 graphs.

    ``gigabytes`` when given; else ``fraction`` of what is free now: on a GPU
    the device's free memory plus what torch's allocator holds unused, on a
    CPU the system's available memory shared by the ranks on this machine.
    """
    if gigabytes is not None:
        return gigabytes * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world()[1])
        free = available_system_memory() / max(1, local_ranks)
    return fraction * free


def available_system_memory() -> float:
    """Bytes the system can still give (Linux MemAvailable; elsewhere, free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
