"""The ``ds-contrastive`` command (also ``python -m ds_contrastive``).

``ds-contrastive env`` prints what a bug report needs: the versions of
Python, torch, DeepSpeed, transformers, sentence-transformers and their
neighbours, the CUDA/NCCL build, the GPUs this process sees, and the
environment variables that change how a run behaves (secrets left out).

``ds-contrastive report RUN_DIR`` plots a finished (or killed) run's
``metrics.jsonl`` into ``RUN_DIR/report/index.html``: one page with the run's
settings and a table of its main metrics, and a PNG per plot beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("ds-contrastive", "torch", "deepspeed", "transformers", "sentence-transformers", "accelerate",
            "datasets", "wandb", "numpy", "pyarrow", "tokenizers", "safetensors")
# Variables that change a run: distributed set-up, NCCL, threads, offline switches, W&B mode.
VARIABLE_PREFIXES = ("NCCL_", "TORCH_NCCL_", "CUDA_", "TORCH_CUDA_ARCH_LIST", "TORCH_EXTENSIONS_DIR", "DEEPSPEED_",
                     "DS_ACCELERATOR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "MASTER_ADDR", "MASTER_PORT",
                     "WORLD_SIZE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "WANDB_MODE",
                     "WANDB_PROJECT", "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NTASKS")


def package_versions() -> dict[str, str]:
    """Installed version of each package of PACKAGES ('not installed' when absent), without importing them."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def accelerator() -> dict[str, Any]:
    """torch's CUDA build and the GPUs this process sees (name, memory, compute capability)."""
    import torch

    info: dict[str, Any] = {"torch CUDA build": torch.version.cuda or "none (CPU build)",
                            "CUDA available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuDNN"] = torch.backends.cudnn.version()
        info["NCCL"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "unknown"
        info["GPUs"] = [f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
                        for i, p in ((i, torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count()))]
    else:
        info["GPUs"] = []
    info["CPU threads (torch)"] = torch.get_num_threads()
    return info


def run_variables() -> dict[str, str]:
    """The environment variables of VARIABLE_PREFIXES, never one whose name says it holds a secret."""
    from .config import SECRET_KEY

    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(VARIABLE_PREFIXES) and not SECRET_KEY.search(k)}


def environment() -> dict[str, Any]:
    """Everything ``ds-contrastive env`` prints."""
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "packages": package_versions(), "accelerator": accelerator(), "variables": run_variables()}


def print_environment(info: dict[str, Any]) -> None:
    print(f"python {info['python']} on {info['platform']}, {info['cpus']} CPUs")
    for name, version in info["packages"].items():
        print(f"{name:<22} {version}")
    for key, value in info["accelerator"].items():
        if key == "GPUs":
            print(f"GPUs: {len(value)}" + "".join(f"\n  {gpu}" for gpu in value))
        else:
            print(f"{key}: {value}")
    print("environment:" if info["variables"] else "environment: (none of the variables that matter is set)")
    for key, value in info["variables"].items():
        print(f"  {key}={value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-contrastive", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="print versions, GPUs and settings for a bug report")
    env.add_argument("--json", action="store_true", help="as one JSON object")
    report = commands.add_parser("report", help="plot a run's metrics into one HTML page")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir (holds metrics.jsonl)")
    report.add_argument("--out", metavar="DIR", help="write the page and its PNGs here (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    if args.command == "env":
        info = environment()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_environment(info)
    elif args.command == "report":
        from ..errors import ReportError
        from .report import write_report  # matplotlib: loaded only for this command

        try:
            print(write_report(args.run_dir, args.out))
        except ReportError as error:
            report.error(str(error))
