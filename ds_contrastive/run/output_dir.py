"""Whose ``output_dir`` it is: a new run never silently overwrites another run's model, metrics or report.

A directory holds a run when it has one of :data:`MARKERS` (files only a
run writes) or a complete checkpoint. A new run there is refused unless it
resumes that run (``--resume``) or replaces it (``--overwrite_output_dir``,
which removes that run's files first: :data:`RUN_FILES` and the model files
its summary lists, nothing else). A run in progress holds a lock on
:data:`LOCK` (rank 0; released when the process ends, however it ends): a
second run is refused there whatever its options.
"""

from __future__ import annotations

import contextlib
import errno
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
MARKERS = (SUMMARY, "run_config.json", "metrics.jsonl")  # written by launch/train.py runs only
# what a run writes besides its model (whose files summary.json lists as model_files)
RUN_FILES = (*MARKERS, "checkpoints", "best", "report", "wandb")
NO_FLOCK = (errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK)  # filesystems without flock


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def run_files(out: Path) -> list[str]:
    """The names of RUN_FILES present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run's output (a marker, or a complete checkpoint): a bare wandb/ or report/ does not."""
    has_checkpoint = checkpoint.newest_checkpoint(out / "checkpoints") is not None
    return has_checkpoint or any((out / name).exists() for name in MARKERS)


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


def lock(out: Path) -> IO[str]:
    """Take ``out``'s lock for this process's life (the returned file must stay open), or refuse: a run holds it.

    On a filesystem without ``flock`` the run goes on unlocked, with a warning.
    """
    out.mkdir(parents=True, exist_ok=True)
    f = (out / LOCK).open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        running = f.read().strip() or "another process"
        f.close()
        raise OutputDirError(f"{out} is being written by a running run ({running}): wait for it, stop it, or "
                             "choose another --output_dir") from None
    except OSError as e:
        if e.errno not in NO_FLOCK:
            f.close()
            raise
        print(f"warning: {out} is on a filesystem without flock: a second run there would not be refused", flush=True)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def remove_run(out: Path) -> str:
    """Delete the run in ``out``: RUN_FILES and the model files its summary lists. Say what was removed."""
    listed = (summary(out) or {}).get("model_files", [])
    model = [n for n in listed if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]
    removed = [name for name in dict.fromkeys([*RUN_FILES, *model]) if name != LOCK and _remove(out / name)]
    run = [name for name in removed if name in RUN_FILES]
    gone = len(removed) - len(run)
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
def claimed(cfg: TrainConfig) -> Iterator[Path | None]:
    """Hold ``cfg.output_dir`` for the run inside; yields the checkpoint to resume from, or None.

    Collective: rank 0 takes the lock, then decides; every rank raises the
    same error. A fresh start where a run is refused, unless
    ``overwrite_output_dir`` replaces it. ``resume='auto'`` with no
    checkpoint starts afresh over an unfinished run (a requeued job killed
    before its first checkpoint); resuming is refused where a run finished.
    """
    out = Path(cfg.output_dir)
    error, found, note, held = None, None, None, None
    if world()[0] == 0:
        try:
            held = lock(out)
            found, note = _decide(cfg)
        except (OutputDirError, CheckpointError) as e:
            error = (type(e).__name__, str(e))
        except OSError as e:  # not a directory, not writable, ...
            error = ("OutputDirError", f"cannot use {out} as output_dir: {e}")
    (error, found, note), *_ = all_gather_objects((error, found, note))
    try:
        if error:
            raise {"OutputDirError": OutputDirError, "CheckpointError": CheckpointError}[error[0]](error[1])
        if note and world()[0] == 0:
            print(note, flush=True)
        yield found
    finally:
        if held is not None:
            Path(held.name).unlink(missing_ok=True)
            held.close()


def _decide(cfg: TrainConfig) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from, a note to print) for a run in ``cfg.output_dir``; removes a replaced run."""
    out, root = Path(cfg.output_dir), checkpoint_root(cfg)
    newest = checkpoint.newest_checkpoint(root)
    if cfg.resume is None:
        if not holds_run(out):
            return None, None
        if cfg.overwrite_output_dir:
            what = describe(out)
            return None, f"replacing {what} in {out}: removed {remove_run(out)}"
        hint = "--resume auto to continue it, " if newest is not None and summary(out) is None else ""
        raise OutputDirError(f"{out} holds {describe(out)} ({', '.join(run_files(out))}): pass --overwrite_output_dir "
                             f"true to replace it (its files are removed, report and checkpoints included), {hint}or "
                             "choose another --output_dir")
    if summary(out) is not None:
        raise OutputDirError(f"{out} holds {describe(out)}: there is nothing to resume; pass --overwrite_output_dir "
                             "true (without --resume) to replace it, or choose another --output_dir")
    if cfg.resume == "auto":
        if newest is not None:
            return newest, None
        if holds_run(out):
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


def entries(out: Path) -> dict[str, int]:
    """Each entry of ``out`` and its modification time (ns): taken before a save, to tell what the save wrote."""
    return {p.name: p.lstat().st_mtime_ns for p in out.iterdir()} if out.is_dir() else {}


def model_files(out: Path, before: dict[str, int]) -> list[str]:
    """The entries of ``out`` (besides RUN_FILES) that are new or changed since ``before``: the saved model's files."""
    return sorted(name for name, mtime in entries(out).items()
                  if name not in (*RUN_FILES, LOCK) and before.get(name) != mtime)
