"""The ``ds-contrastive`` command (also ``python -m ds_contrastive``).

``ds-contrastive env`` prints what a bug report needs: the versions of
Python, torch, DeepSpeed, transformers, sentence-transformers and their
neighbours, the CUDA/NCCL build, the GPUs this process sees, and the
environment variables that change how a run behaves (secrets left out).

``ds-contrastive report RUN_DIR`` plots a finished (or killed) run's
``metrics.jsonl`` into ``RUN_DIR/report/index.html``: one page with the run's
settings and a table of its main metrics, and a PNG per plot beside it.

``ds-contrastive plan --model MODEL ...`` estimates one rank's GPU memory for
a run (parameters, gradients, optimizer state, activations, kept graphs,
gathered embeddings, loss tiles) before starting it, suggests
``chunk_tokens`` and ``retain_tokens``, or says what does not fit and what to
change (:mod:`~ds_contrastive.run.memory_plan`); ``--json`` for scripts.

``ds-contrastive mine --pairs FILE --output FILE ...`` mines hard negatives
for (anchor, positive) pairs with sentence-transformers' selection options
(:mod:`~ds_contrastive.mining`); ``deepspeed --module ds_contrastive.mining``
or ``torchrun -m ds_contrastive.mining`` runs it on several ranks;
``ds-contrastive mine --help`` lists its options.
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


def add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    """The planner's options, named as the training options and DeepSpeed keys they stand for."""
    from .memory_plan import ATTENTIONS, OFFLOADS, PRESETS, PlanOptions

    defaults = PlanOptions()
    plan.add_argument("--model", required=True, help="a model or SentenceTransformer directory (its config.json), "
                                                     f"or a preset: {', '.join(PRESETS)}")
    plan.add_argument("--gpu_memory_gb", type=float, default=defaults.gpu_memory_gb, help="memory of one GPU, GiB")
    plan.add_argument("--world_size", type=int, default=defaults.world_size, help="ranks (GPUs) in all")
    plan.add_argument("--zero_stage", type=int, default=defaults.zero_stage, help="DeepSpeed ZeRO stage, 0-3")
    plan.add_argument("--offload", default=defaults.offload, help=f"to the CPU: {', '.join(OFFLOADS)}")
    plan.add_argument("--precision", default=defaults.precision, help="bf16 or fp32")
    plan.add_argument("--lora_rank", type=int, help="train LoRA adapters of this rank only")
    plan.add_argument("--lora_target_modules", default=",".join(defaults.lora_target_modules),
                      help="LoRA's Linear modules, comma-separated (BERT's: query,key,value,dense)")
    plan.add_argument("--gradient_checkpointing", action="store_true", help="recompute each layer in the backward")
    plan.add_argument("--attention", default=defaults.attention, help=f"{', '.join(ATTENTIONS)} (eager: L^2 scores)")
    plan.add_argument("--global_batch_size", type=int, default=defaults.global_batch_size, help="rows per step")
    plan.add_argument("--columns", type=int, default=defaults.columns,
                      help="texts per row: anchor, positive and hard negatives")
    plan.add_argument("--max_length", type=int, default=defaults.max_length, help="truncation, in tokens")
    plan.add_argument("--embedding_dim", type=int, help="the embedding's size (default: the hidden size)")
    plan.add_argument("--chunk_tokens", type=int, help="padded tokens per forward call (default: suggested)")
    plan.add_argument("--retain_tokens", type=int, help="padded tokens of kept pass-1 graphs (default: suggested)")
    plan.add_argument("--reduce_bucket_size", type=int, default=defaults.reduce_bucket_size,
                      help="DeepSpeed's zero_optimization.reduce_bucket_size")
    plan.add_argument("--prefetch_bucket_size", type=int, default=defaults.prefetch_bucket_size,
                      help="DeepSpeed's zero_optimization.stage3_prefetch_bucket_size")
    plan.add_argument("--json", action="store_true", help="as one JSON object")


def run_plan(args: argparse.Namespace) -> str:
    """The plan of ``args``, as the table or as JSON; ConfigError names a bad option."""
    from .memory_plan import PlanOptions, describe, model_shape, plan

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "model", "json")}
    fields["lora_target_modules"] = tuple(m.strip() for m in fields["lora_target_modules"].split(",") if m.strip())
    result = plan(model_shape(args.model), PlanOptions(**fields))
    return json.dumps(result.to_json(), indent=2) if args.json else describe(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-contrastive", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="print versions, GPUs and settings for a bug report")
    env.add_argument("--json", action="store_true", help="as one JSON object")
    report = commands.add_parser("report", help="plot a run's metrics into one HTML page")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir (holds metrics.jsonl)")
    report.add_argument("--out", metavar="DIR", help="write the page and its PNGs here (default: RUN_DIR/report)")
    plan = commands.add_parser("plan", help="estimate one rank's GPU memory; suggest chunk_tokens, retain_tokens")
    add_plan_arguments(plan)
    # its own parser reads the rest (kept out of here: its defaults import torch)
    commands.add_parser("mine", help="mine hard negatives for (anchor, positive) pairs", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "mine":
        from ..mining.cli import main as mine

        return mine(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
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
    elif args.command == "plan":
        from ..errors import ConfigError

        try:
            print(run_plan(args))
        except ConfigError as error:
            plan.error(str(error))
