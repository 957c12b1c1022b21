"""Start real multi-process jobs for the tests: the deepspeed launcher with a free port and a time limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ds_contrastive.core.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]


# What an in-process one-rank group (ds_contrastive.core.runtime.init_process_group) leaves in this
# process's environment: a child job must not inherit it (its MASTER_PORT is bound by this process).
PROCESS_GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARIABLES}
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE=env.get("WANDB_MODE", "offline"),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "support"), env.get("PYTHONPATH", "")]),
    )
    return env


LAUNCHERS = {
    "python": lambda n: [sys.executable],  # one process, no launcher
    "deepspeed": lambda n: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
                            "--master_port", str(free_port())],
    "torchrun": lambda n: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                           "--master_port", str(free_port())],
    "accelerate": lambda n: [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", str(free_port())],
}


def wait_or_kill(proc: subprocess.Popen, cmd: list[str], timeout: float) -> str:
    """The output of ``proc`` (started with ``start_new_session``); past ``timeout`` kill its whole group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} ran past {timeout}s:\n{out[-8000:]}") from None
    return out


def run_deepspeed(script: str | Path, nprocs: int, args: list[str], timeout: float, env: dict | None = None,
                  cwd: Path | None = None, launcher: str = "deepspeed", launcher_args: list[str] = ()
                  ) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nprocs`` CPU ranks under ``launcher`` (see LAUNCHERS); fail loudly with its output."""
    cmd = [*LAUNCHERS[launcher](nprocs), *launcher_args, str(script), *args]
    proc = subprocess.Popen(cmd, env=env or job_env(), cwd=cwd or ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = wait_or_kill(proc, cmd, timeout)
    proc = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-8000:]
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def run_worker(name: str, nprocs: int, model_dir: Path, out_dir: Path, extra: list[str] = (),
               timeout: float = 600, launcher: str = "deepspeed", launcher_args: list[str] = ()) -> object:
    """Run ``tests/distributed/NAME_worker.py`` on ``nprocs`` ranks and return the JSON report rank 0 wrote."""
    out = Path(out_dir) / f"{name}.json"
    run_deepspeed(ROOT / f"tests/distributed/{name}_worker.py", nprocs,
                  ["--model", str(model_dir), "--out", str(out), *extra], timeout=timeout, launcher=launcher,
                  launcher_args=launcher_args)
    return json.loads(out.read_text())
