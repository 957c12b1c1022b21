"""Training checkpoints that resume exactly and are never half-written where a resume looks.

Layout of a checkpoint root (``<output_dir>/checkpoints`` for ``launch/train.py``)::

    step-00000200/                       a complete checkpoint
        mp_rank_00_model_states.pt       DeepSpeed's files: model (and the learnable
        zero_pp_rank_*_optim_states.pt   temperature, a parameter), optimizer, LR scheduler
        rank-00000.json, rank-00001.json each rank's RNG states and its own state
        state.json                       the run's state: step, counters, caller's data (last written)
    step-00000300.partial/               a save in progress or killed: never read, removed later
    latest                               the name of the newest complete checkpoint

A save writes everything into ``step-N.partial``, flushes each file to disk,
renames the directory to ``step-N`` (the commit: a rename is atomic) and then
replaces ``latest`` the same way (temporary file, flush, rename). A process
killed at any moment therefore leaves ``latest``, and every ``step-N`` without
``.partial``, complete and loadable. Resuming takes the newest complete one.

The root must be on a filesystem every rank sees (as DeepSpeed assumes for
loading); a save checks it. Loading uses ``torch.load(weights_only=True)``
with only DeepSpeed's few checkpoint classes allowed: a checkpoint file
cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.collectives import first_error, min_over_ranks
from ..core.runtime import world
from ..errors import CheckpointError

STATE_FILE = "state.json"
LATEST = "latest"
PARTIAL = ".partial"
FORMAT = 1
_NAME = re.compile(r"^step-(\d+)$")


class Schedule:
    """When to write a checkpoint: every ``every_steps`` steps and/or ``every_minutes`` after the last one.

    The minutes are measured on every rank and a save happens when every
    rank's clock says so (one small collective per step), so all ranks
    decide alike.
    """

    def __init__(self, every_steps: int | None, every_minutes: float | None, device: torch.device) -> None:
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60 if every_minutes else None
        self.device = device
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether to checkpoint after ``step`` steps; collective when minutes are set."""
        due = bool(self.every_steps) and step % self.every_steps == 0
        if self.every_seconds is not None:
            late = int(time.monotonic() - self.last >= self.every_seconds)
            due = min_over_ranks(late, self.device) == 1 or due
        if due:
            self.last = time.monotonic()
        return due


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def newest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint of the highest step under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: ``path`` is old or new, never partial."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_file(path.parent)


def _owned_files(directory: Path, rank: int) -> list[Path]:
    """The files DeepSpeed wrote for ``rank`` in ``directory``: its ``(bf16_)zero_pp_rank_R_*``; the rest on rank 0.

    Our own ``rank-R.json`` files are flushed by their writers (and may be mid-rename now).
    """
    mine = re.compile(rf"^(bf16_)?zero_pp_rank_{rank}_")
    anyone = re.compile(r"^((bf16_)?zero_pp_rank_\d+_|rank-\d+\.json)")
    return [p for p in directory.rglob("*") if p.is_file()
            and (mine.search(p.name) or (rank == 0 and not anyone.search(p.name)))]


def _agree_on_errors(error: str | None) -> None:
    """Raise on every rank if any rank reports an error (the others would wait forever otherwise)."""
    error = first_error(error)
    if error:
        raise CheckpointError(error)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and current CUDA device) generator states, as JSON values."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save(ds_engine: Any, root: str | Path, step: int, state: dict[str, Any], rank_state: dict[str, Any],
         keep: int | None = None) -> Path:
    """Write checkpoint ``step-<step>`` under ``root`` atomically; keep the newest ``keep`` (None: all).

    Collective: every rank calls it. ``state`` (JSON, rank 0's) is the run's
    state; ``rank_state`` (JSON) is this rank's own and is stored with its RNG
    states. A failure on any rank is raised on every rank, and ``latest``
    still names the previous complete checkpoint.
    """
    check_checkpoint_engine(ds_engine)
    rank, world_size = world()
    root = Path(root)
    final = root / checkpoint_name(step)
    partial = final.with_name(final.name + PARTIAL)
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # a save of this step that was killed
        except OSError as e:
            error = f"cannot prepare {partial}: {e}"
    _agree_on_errors(error)
    ds_engine.save_checkpoint(str(root), tag=partial.name, client_state={}, save_latest=False)
    try:
        _write_durably(partial / f"rank-{rank:05d}.json", json.dumps({"rng": rng_state(), **rank_state}))
        for path in _owned_files(partial, rank):
            _fsync_file(path)
    except OSError as e:
        error = f"rank {rank}: writing {partial} failed: {e}"
    _agree_on_errors(error)
    if rank == 0:
        try:
            missing = [r for r in range(world_size) if not (partial / f"rank-{r:05d}.json").is_file()]
            if missing:
                raise OSError(f"rank 0 cannot see the files of ranks {missing}: checkpoints need a directory "
                              "that every rank shares")
            record = {"format": FORMAT, "step": step, "world_size": world_size, "saved_at": time.time(), **state}
            _write_durably(partial / STATE_FILE, json.dumps(record, indent=2) + "\n")
            if final.exists():  # left by a run killed between this rename and ``latest``: never the newest read
                _remove(final)
            os.rename(partial, final)
            _fsync_file(root)
            _write_durably(root / LATEST, final.name + "\n")
            _prune(root, keep, step)
        except OSError as e:
            error = f"committing {final} failed: {e}"
    _agree_on_errors(error)
    if not (final / STATE_FILE).is_file():
        error = f"rank {rank} cannot see {final}: checkpoints need a directory that every rank shares"
    _agree_on_errors(error)
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that a kill midway never leaves it looking complete."""
    doomed = path.with_name(path.name + ".removing" + PARTIAL)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(root: Path, keep: int | None, step: int) -> None:
    """Remove killed saves, and the checkpoints before ``step`` beyond the newest ``keep`` (``step`` included)."""
    for path in root.glob(f"step-*{PARTIAL}"):
        shutil.rmtree(path, ignore_errors=True)
    if keep is not None:
        older = [p for p in complete_checkpoints(root) if int(_NAME.match(p.name).group(1)) < step]
        for path in older[: max(0, len(older) - (keep - 1))]:
            _remove(path)


def read_state(path: str | Path) -> dict[str, Any]:
    """The run state of checkpoint ``path`` (local, no collective); CheckpointError if it is not one."""
    path = Path(path)
    if path.name.endswith(PARTIAL):
        raise CheckpointError(f"{path} is an unfinished save, not a checkpoint")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a complete checkpoint (no readable {STATE_FILE}: {e})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
    return state


def load(ds_engine: Any, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load checkpoint ``path`` into the DeepSpeed engine; restore this rank's RNG states.

    Collective. Returns (the run state, this rank's own state). The engine must
    be freshly built with the same model, optimizer, scheduler, DeepSpeed
    config and world size as the run that saved it.
    """
    rank, world_size = world()
    path = Path(path)
    error, state, mine = None, {}, {}
    try:
        state = read_state(path)
        if state["world_size"] != world_size:
            raise CheckpointError(f"{path} was saved by {state['world_size']} ranks; this run has {world_size} "
                                  "(ZeRO partitions optimizer state per rank: resume with the same number)")
        mine = json.loads((path / f"rank-{rank:05d}.json").read_text())
        if ds_engine.zero_optimization() and not list(path.glob(f"*zero_pp_rank_{rank}_*")):
            raise CheckpointError(f"{path} has no ZeRO files of rank {rank}")
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        error = f"rank {rank}: {e}"
    _agree_on_errors(error)
    check_checkpoint_engine(ds_engine)
    with weights_only_loads():
        loaded, _ = ds_engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    _agree_on_errors(None if loaded else f"rank {rank}: DeepSpeed found no checkpoint in {path}")
    set_rng_state(mine.pop("rng"))
    return state, mine


def checkpoint_classes() -> list[Any]:
    """The DeepSpeed classes its checkpoints hold: all that ``weights_only`` loading may rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_checkpoint_engine(ds_engine: Any) -> None:
    """Refuse DeepSpeed checkpoint engines other than the default one.

    The atomic commit needs every file written when ``save_checkpoint``
    returns (the decoupled and fast writers finish later), and safe loading
    replaces the default engine's ``load``.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(ds_engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"ds_contrastive checkpoints need DeepSpeed's default checkpoint engine, not "
                              f"{type(ds_engine.checkpoint_engine).__name__}: remove the 'checkpoint' writer "
                              "settings from the DeepSpeed config")
    if ds_engine.load_universal_checkpoint():  # DeepSpeed reads those with torch.load(weights_only=False) directly
        raise CheckpointError("'checkpoint.load_universal' is not supported: its loader unpickles files unrestricted")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this block DeepSpeed reads checkpoint files with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19 loads them with ``weights_only=False``: unpickling a
    tampered file would run its code. Every DeepSpeed load goes through its
    checkpoint engine's ``load``, which is replaced for the duration by one
    that rebuilds tensors, containers and only :func:`checkpoint_classes`.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load

    def load(self: TorchCheckpointEngine, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original
