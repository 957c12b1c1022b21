"""What a training run prints: rank 0's progress, and one ``error:`` line for a mistake the user can fix.

Under a launcher every rank writes to the same terminal. The other ranks'
library chatter (DeepSpeed's and transformers' logs, warnings, loading
bars) is silenced by :func:`quiet_other_ranks`, and so are warnings that no
user can act on, on every rank.

A config, data, batch or checkpoint problem is the user's to fix, and its
message already says how; a traceback only buries it, and under a launcher
every rank would print its own copy. So such an error prints
``error: <message>`` on rank 0 alone and exits with the code of its kind
(:data:`EXIT_CODES`, the README's table). Anything else is a bug and keeps
its traceback. ``--debug`` or ``DS_CONTRASTIVE_DEBUG=1`` shows the traceback
of every error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator

from ..errors import BatchError, CheckpointError, ConfigError, DataError, NonFiniteLoss, OutputDirError, RankFailure

# 1 is Python's own for a crash (with its traceback); argparse's usage errors are ConfigErrors here, as its 2 says.
EXIT_CODES: dict[type[Exception], int] = {
    ConfigError: 2,
    DataError: 3,
    BatchError: 3,
    OutputDirError: 4,
    CheckpointError: 4,
    NonFiniteLoss: 5,
    RankFailure: 6,
}
DEBUG_VARIABLE = "DS_CONTRASTIVE_DEBUG"
# deprecations one library raises about another's calls (torch about DeepSpeed's, DDP about accelerate's)
LIBRARY_DEPRECATIONS = (r".*all_gather_into_tensor.* is deprecated", r".*`broadcast_buffers` is deprecated")
# How long a rank other than 0 stays silent: rank 0 prints the same error and exits, and the launcher
# stops the job before this runs out. A rank still alive after it is the only one with the error: it speaks.
QUIET_SECONDS = 15.0


def exit_code(error: BaseException) -> int | None:
    """The documented exit code of a user-fixable error; None for anything else (a bug)."""
    for kind, code in EXIT_CODES.items():
        if isinstance(error, kind):
            return code
    return None


def debugging(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_VARIABLE, "").lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def clean_errors(debug: bool = False) -> Iterator[None]:
    """Turn a user-fixable error raised inside into one ``error:`` line on rank 0 and its exit code.

    Errors of this kind are raised on every rank alike (the ranks read the
    same config and data, and agree on batch and checkpoint errors through a
    collective), so rank 0 alone prints. The others wait ``QUIET_SECONDS``
    for the launcher to stop them once rank 0 has exited; one that is still
    running then prints its own error, which only it has.
    """
    try:
        yield
    except Exception as error:
        code = exit_code(error)
        if code is None or debugging(debug):
            raise
        if launcher_rank() != 0:
            time.sleep(QUIET_SECONDS)
        print(f"error: {error}", file=sys.stderr, flush=True)
        _leave_process_group()
        sys.exit(code)


def _leave_process_group() -> None:
    """Close this rank's process group, without waiting for the others (which may never come).

    Exiting with a gloo group still open aborts the process in its C++
    destructors ("terminate called without an active exception"), and the
    launcher would report that abort instead of the error's exit code.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quiet_other_ranks() -> None:
    """Silence what a user cannot act on: everything but errors on ranks other than 0, known noise on rank 0."""
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    if launcher_rank() == 0:
        return
    warnings.simplefilter("ignore")
    for name in ("DeepSpeed", "transformers", "sentence_transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def launcher_rank() -> int:
    """This process's global rank as its launcher set it (the process group may not exist yet)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0
