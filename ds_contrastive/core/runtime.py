"""The process group's life: rank and size, start-up, collective timeouts, failures, shutdown."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator

import torch.distributed as dist

from ..errors import RankFailure


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_seconds: float | None = None) -> None:
    """Initialise DeepSpeed's process group, also for a plain single-process run.

    Under a launcher (deepspeed, torchrun, accelerate, srun) the environment
    names the group. Run as plain ``python``, we set up a one-rank group on a
    free local port so that the same engine code runs unchanged.
    ``timeout_seconds``: how long a collective waits for the other ranks
    before it fails (DeepSpeed's default, 10 minutes, when None); a hung rank
    then stops the others instead of leaving them waiting forever.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    skip_shm_comm_op()
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = {} if timeout_seconds is None else {"timeout": datetime.timedelta(seconds=timeout_seconds)}
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **timeout)


def share_cpu_threads() -> None:
    """On a CPU-only machine, give each local rank its share of this process's cores, unless OMP_NUM_THREADS is set.

    torch starts as many threads as there are cores in every rank, so N ranks
    on one machine oversubscribe it N times (accelerate counts physical cores
    where a container may allow fewer). Setting the variable as well keeps
    accelerate from choosing its own count later.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op when a process group starts.

    On a CPU, DeepSpeed's comm backend JIT-compiles that C++ op (a compiler
    and 20 s to 2 min on the first run; a stale build lock hangs later ones)
    and leaves a 69 MB buffer per rank in ``/dev/shm``. Only its tensor-
    parallel inference all-reduce uses the op; training's collectives are
    gloo's. ``deepspeed.ops.__compatible_ops__`` is the table DeepSpeed
    consults before building it, cached once per process. Called where a
    process group may start: :func:`init_process_group`, and on importing
    the Trainer integration (a Trainer's arguments start DeepSpeed's group
    before the Trainer exists).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def set_collective_timeout(seconds: float) -> None:
    """Give every process group that exists now (DeepSpeed's included) this collective timeout.

    ``init_process_group`` sets the world group's; groups made later (ZeRO's
    data-parallel group, for one) get torch's default of 30 minutes (NCCL: 10),
    so a rank would wait that long for a hung peer. torch has no public way to
    change a group's timeout; ``_set_pg_timeout`` is its internal one.
    """
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=seconds)
    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer died or timed out (gloo or NCCL)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                                      "Timed out waiting", "NCCL communicator was aborted", "Watchdog caught"))


@contextlib.contextmanager
def collective_failures(timeout_seconds: float, after: str = "") -> Iterator[None]:
    """Turn a collective's failure (a peer died or hung) into a :class:`RankFailure` that says so.

    ``after`` is added to the message (for example where to resume from).
    """
    try:
        yield
    except Exception as e:
        if not is_collective_failure(e):
            raise
        rank = world()[0]
        raise RankFailure(
            f"rank {rank}: a collective with the other ranks failed: another rank died, or did not answer within "
            f"collective_timeout_seconds={timeout_seconds:g}; its own log says why. {after}(cause: "
            f"{type(e).__name__}: {str(e)[:300]})") from e


def shutdown() -> None:
    """Leave the process group together: wait for every rank, then destroy the group.

    A rank that exits while another still works (rank 0 evaluating or
    writing after training) tears down its gloo connections under the
    other's feet; on the CPU that was seen to abort the exiting rank
    ("terminate called without an active exception"), failing the job.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
