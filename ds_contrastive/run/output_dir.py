"""Whose ``output_dir`` it is: a new run never silently overwrites another run's model, metrics or report.

A directory holds a run when it has any of :data:`RUN_FILES`. A new run
there is refused unless it resumes that run (``--resume``) or replaces it
(``--overwrite_output_dir``, which removes the old run's files first, its
report and checkpoints included, and nothing else). A run in progress holds
a lock on :data:`LOCK` (rank 0, released when the process ends, however it
ends): a second run is refused there whatever its options.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..core.collectives import all_gather_objects
from ..core.runtime import world
from ..errors import CheckpointError, OutputDirError
from . import checkpoint
from .config import TrainConfig

LOCK = ".ds_contrastive.lock"
SUMMARY = "summary.json"
# what a launch/train.py run writes besides its model (whose files summary.json lists as model_files)
RUN_FILES = (SUMMARY, "metrics.jsonl", "run_config.json", "checkpoints", "best", "report", "wandb", LOCK)


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def run_files(out: Path) -> list[str]:
    """The names of RUN_FILES present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def summary(out: Path) -> dict | None:
    """The summary.json of a finished run in ``out`` ({} when unreadable), or None when there is none."""
    if not (out / SUMMARY).is_file():
        return None
    try:
        found = json.loads((out / SUMMARY).read_text())
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def describe(out: Path) -> str:
    """'a finished run (...)' or 'an unfinished run (...)', for messages."""
    finished = summary(out)
    if finished is not None:
        steps = finished.get("steps")
        return f"a finished run{f' of {steps} steps' if steps is not None else ''}"
    newest = checkpoint.newest_checkpoint(out / "checkpoints")
    return f"an unfinished run (newest checkpoint: {newest.name if newest else 'none'})"


def holder(out: Path) -> str | None:
    """Who holds ``out``'s lock right now ('pid P on HOST'), or None when no running run does."""
    path = out / LOCK
    if not path.is_file():
        return None
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def lock(out: Path) -> IO[str]:
    """Take ``out``'s lock for this process's life; the returned file must stay open."""
    out.mkdir(parents=True, exist_ok=True)
    f = (out / LOCK).open("a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # holder() just found it free; a race fails loudly here
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def remove_run(out: Path) -> str:
    """Delete the run in ``out``: RUN_FILES and the model files its summary lists. Say what was removed."""
    listed = (summary(out) or {}).get("model_files", [])
    model = [n for n in listed if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]
    removed = [name for name in [*RUN_FILES, *model] if _remove(out / name)]
    run = [name for name in removed if name in RUN_FILES and name != LOCK]
    gone = len(removed) - len(run) - (LOCK in removed)
    return ", ".join(run + ([f"its model ({gone} files)"] if gone else [])) or "nothing"


def _remove(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True


@contextlib.contextmanager
def claimed(cfg: TrainConfig) -> Iterator[tuple[Path | None, float | None]]:
    """Hold ``cfg.output_dir`` for the run inside: yields (the checkpoint to resume from or None, the claim's time).

    Collective: rank 0 decides, every rank raises the same error. A fresh
    start where a run is refused, unless ``overwrite_output_dir`` replaces it;
    ``resume='auto'`` with no checkpoint starts afresh over an unfinished run
    (a requeued job killed before its first checkpoint) but not over a
    finished one. The claim's time (rank 0's, as the filesystem stamps it)
    tells the files this run writes from those that were there before.
    """
    error, found, note, held = None, None, None, None
    if world()[0] == 0:
        try:
            found, note = _decide(cfg)
            held = lock(Path(cfg.output_dir))
        except (OutputDirError, CheckpointError) as e:
            error = (type(e).__name__, str(e))
    (error, found, note), *_ = all_gather_objects((error, found, note))
    if error:
        raise {"OutputDirError": OutputDirError, "CheckpointError": CheckpointError}[error[0]](error[1])
    if note and world()[0] == 0:
        print(note, flush=True)
    try:
        yield found, os.fstat(held.fileno()).st_mtime if held else None
    except BaseException:
        # the lock file stays as the mark of an unfinished run, unless the run wrote nothing else
        _release(held, remove=held is not None and run_files(Path(cfg.output_dir)) == [LOCK])
        raise
    _release(held, remove=True)


def _release(held: IO[str] | None, remove: bool) -> None:
    if held is not None:
        if remove:
            Path(held.name).unlink(missing_ok=True)
        held.close()


def _decide(cfg: TrainConfig) -> tuple[Path | None, str | None]:
    out, root = Path(cfg.output_dir), checkpoint_root(cfg)
    if (running := holder(out)) is not None:
        raise OutputDirError(f"{out} is being written by a running run ({running}): wait for it, stop it, or choose "
                             "another --output_dir")
    present = [name for name in run_files(out) if name != LOCK]  # a lock alone: killed before it wrote anything
    newest = checkpoint.newest_checkpoint(root)
    if cfg.resume is None:
        if not present:
            return None, None
        if cfg.overwrite_output_dir:
            what = describe(out)
            return None, f"replacing {what} in {out}: removed {remove_run(out)}"
        hint = "--resume auto to continue it, " if newest is not None else ""
        raise OutputDirError(f"{out} holds {describe(out)} ({', '.join(present)}): pass --overwrite_output_dir true to "
                             f"replace it (its files are removed, report and checkpoints included), {hint}or choose "
                             "another --output_dir")
    if cfg.resume == "auto":
        if newest is not None:
            return newest, None
        if summary(out) is not None:
            raise OutputDirError(f"{out} holds {describe(out)} and no checkpoint to resume from: pass "
                                 "--overwrite_output_dir true (without --resume) to replace it, or choose another "
                                 "--output_dir")
        if present:
            return None, f"no checkpoint in {root} to resume from: starting afresh (removed {remove_run(out)})"
        return None, None
    given = Path(cfg.resume)
    found = given if (given / checkpoint.STATE_FILE).is_file() else checkpoint.newest_checkpoint(given)
    if found is None:
        raise CheckpointError(f"resume={cfg.resume!r} is neither a checkpoint nor a directory of checkpoints")
    if newest is not None and found.resolve() != newest.resolve():
        raise CheckpointError(f"{root} already holds {newest.name}, which resuming from {found} would overwrite or mix "
                              "with: move those checkpoints away, or resume from the newest")
    return found, None


def model_files(out: Path, since: float) -> list[str]:
    """The entries of ``out`` besides RUN_FILES written since ``since`` (a file time): the model this run saved."""
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and p.lstat().st_mtime >= since)
