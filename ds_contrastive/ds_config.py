"""Reading and checking a DeepSpeed config for the contrastive step.

The contrastive global batch is set by the data (every rank's shard in one
``train_step``), not by DeepSpeed's batch keys, so those are fixed here to one
micro-batch per rank and one accumulation step. Options the engine cannot run
exactly are refused with a message that says why.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that ds_contrastive refuses to run, with the reason."""


def load_ds_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Load a DeepSpeed config from a JSON file or take a dict (copied)."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e


def _number(value: Any) -> Any:
    return None if value == "auto" else value


def resolve_ds_config(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Check ``config`` and return the copy the engine hands to DeepSpeed.

    Refused: ``gradient_accumulation_steps > 1`` (accumulating several global
    batches is not one larger contrastive batch: negatives would not cross
    micro-batches; make the global batch larger instead, the cached step
    costs no extra memory); fp16 (dynamic loss scaling skips steps and the
    engine's exactness is only proven for fp32 and bf16); ZeRO stages other
    than 0-3; ``managed_gradient_accumulation: false``; pipeline parallelism;
    a numeric batch size other than one micro-batch per rank.
    """
    cfg = copy.deepcopy(config)
    gas = _number(cfg.get("gradient_accumulation_steps", 1))
    if gas not in (None, 1):
        raise ConfigError(
            f"gradient_accumulation_steps={gas} is refused: accumulating {gas} global batches is not one "
            f"contrastive batch {gas}x larger (negatives do not cross accumulation steps). Put the whole "
            "global batch into one train_step instead; the cached step keeps memory flat."
        )
    micro = _number(cfg.get("train_micro_batch_size_per_gpu", 1))
    if micro not in (None, 1):
        raise ConfigError(
            f"train_micro_batch_size_per_gpu={micro}: the contrastive batch size is set by the data "
            "(global_batch_size of the training config), leave it 'auto' or out"
        )
    total = _number(cfg.get("train_batch_size"))
    if total not in (None, world_size):
        raise ConfigError(
            f"train_batch_size={total}: the contrastive batch size is set by the data "
            "(global_batch_size of the training config), leave it 'auto' or out"
        )
    if cfg.get("fp16", {}).get("enabled") in (True, "auto"):
        raise ConfigError("fp16 is not supported (loss scaling skips steps the cached step cannot redo): use bf16 or fp32")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r}: the engine runs ZeRO stages 0, 1, 2 and 3")
    if cfg.get("managed_gradient_accumulation", True) is False:
        raise ConfigError("managed_gradient_accumulation=false is not supported: the engine owns the reduction")
    if cfg.get("pipeline", {}).get("stages", 1) not in (1, "auto"):
        raise ConfigError("pipeline parallelism is not supported")
    if cfg.get("bf16", {}).get("enabled") == "auto":
        raise ConfigError("bf16.enabled='auto' cannot be resolved here: set true or false")
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = world_size
    return cfg


def precision(config: dict[str, Any]) -> str:
    """'bf16' or 'fp32'."""
    return "bf16" if config.get("bf16", {}).get("enabled") else "fp32"


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
