"""The machine and software a run measured: the card's short name, package versions, the git state; process setup.

These facts go into every report, so that a result can be traced to the code, the libraries and the
card that produced it (the git state lists uncommitted changes under ds_contrastive/ and bench/).
The run is one process, so it sets the variables torch.distributed would get from a launcher.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from . import ROOT


def git_state() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - no git on the machine
            return ""

    return {"commit": run("git", "rev-parse", "HEAD") or None,
            "dirty_files": [line[3:] for line in run("git", "status", "--porcelain").splitlines()
                            if line[3:].startswith(("ds_contrastive/", "bench/"))]}


def card_slug(name: str) -> str:
    """A short card name from the device's name (h200, h100, ...), for the estimates and the file name."""
    low = name.lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10g", "b200", "gh200"):
        if key in low:
            return "gh200" if key == "h200" and "gh200" in low else key
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "gpu"


def init_single_process() -> None:
    """Rank 0 of a world of one (unless a launcher set RANK), on a free port; DeepSpeed's logger at WARNING."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "RANK" not in os.environ:
        from ds_contrastive.core.runtime import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_PORT=str(free_port()))
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)


def software() -> dict:
    """Versions of Python and the libraries timed, where ds_contrastive was imported from, git, CPUs, the port."""
    import deepspeed
    import sentence_transformers
    import torch
    import transformers

    import ds_contrastive

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "deepspeed": deepspeed.__version__,
            "ds_contrastive": getattr(ds_contrastive, "__version__", None),
            "ds_contrastive_path": str(Path(ds_contrastive.__file__).parent), "git": git_state(),
            "cpu_count": os.cpu_count(), "master_port": os.environ.get("MASTER_PORT")}
