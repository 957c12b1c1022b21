"""Reading and checking a DeepSpeed config for the contrastive step.

The contrastive global batch is set by the data (every rank's shard in one
``train_step``), not by DeepSpeed's batch keys, so those are fixed here to one
micro-batch per rank and one accumulation step. Options the engine cannot run
exactly are refused with a message that says why.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from ..configs import config_file
from ..errors import ConfigError

# DeepSpeed's batch keys: the engine sets them (one micro-batch per rank, one accumulation step)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def did_you_mean(key: str, candidates: Any) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(key, sorted(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_ds_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Load a DeepSpeed config from a JSON file or a shipped config's name (``zero2``), or take a dict (copied)."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = config_file(source, "deepspeed", "DeepSpeed config")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_without_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"DeepSpeed config {path}: {e}") from None


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One JSON object; a key given twice is refused (json keeps the last silently, DeepSpeed's reader refuses)."""
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ConfigError(f"key {twice[0]!r} is given twice in one object")
    return dict(pairs)


def _number(value: Any) -> Any:
    return None if value == "auto" else value


def refuse_accumulation(gas: Any) -> None:
    """Refuse ``gradient_accumulation_steps`` > 1: accumulated global batches are not one larger contrastive batch."""
    gas = _number(gas)
    if gas not in (None, 1):
        raise ConfigError(
            f"gradient_accumulation_steps={gas} is refused: accumulating {gas} global batches is not one "
            f"contrastive batch {gas}x larger (negatives do not cross accumulation steps). Put the whole "
            "global batch into one train_step instead; the cached step keeps memory flat."
        )


def resolve_ds_config(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Check ``config`` and return the copy the engine hands to DeepSpeed.

    DeepSpeed's batch keys are set here to one micro-batch per rank (one
    DeepSpeed "sample" is a rank's whole shard) and one accumulation step.
    The engine does not know the global batch, so it takes those keys only as
    ``'auto'``, absent, or the values it sets itself (``train_batch_size`` =
    ``world_size``, micro-batch 1). ``launch/train.py`` checks numbers given in
    examples against ``global_batch_size`` first
    (:func:`~ds_contrastive.deepspeed_config.checks.check_batch_keys`) and passes them on as
    ``'auto'``; other ``'auto'`` values must be resolved before
    (:func:`~ds_contrastive.deepspeed_config.auto.resolve_auto`).

    Refused: ``gradient_accumulation_steps > 1`` (accumulating several global
    batches is not one larger contrastive batch: negatives would not cross
    micro-batches; make the global batch larger instead, the cached step
    costs no extra memory); fp16 (dynamic loss scaling skips steps and the
    engine's exactness is only proven for fp32 and bf16); ZeRO stages other
    than 0-3; ``managed_gradient_accumulation: false``; pipeline parallelism;
    batch-size numbers other than the engine's own; ``bf16.enabled: 'auto'``.
    """
    cfg = copy.deepcopy(config)
    refuse_accumulation(cfg.get("gradient_accumulation_steps", 1))
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
        raise ConfigError("bf16.enabled='auto' cannot be resolved here: set true or false, or resolve it from the "
                          "training config first (ds_contrastive.deepspeed_config.auto.resolve_auto)")
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = world_size
    return cfg


def precision(config: dict[str, Any]) -> str:
    """'bf16' or 'fp32'."""
    return "bf16" if config.get("bf16", {}).get("enabled") else "fp32"


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage, 0 without a zero_optimization section."""
    return int(config.get("zero_optimization", {}).get("stage", 0))
