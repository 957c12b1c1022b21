"""Resolving a DeepSpeed config's ``"auto"`` values from the training config and the model.

The HF Trainer convention: a DeepSpeed config may leave values ``"auto"`` that
the training run knows (learning rate, schedule, precision, bucket sizes from
the model's hidden size). ``launch/train.py`` fills them the same way, refuses
numbers that contradict the training config (one of the two would be silently
ignored), and prints what it filled. DeepSpeed's batch keys are not resolved
here: the engine sets them (see :func:`~ds_contrastive.deepspeed_config.loading.resolve_ds_config`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .loading import BATCH_KEYS

if TYPE_CHECKING:
    from ..run.config import TrainConfig

# "auto" there is not ours to resolve: the engine sets the batch keys; the others are DeepSpeed's own value
NOT_PLACEHOLDERS = frozenset({*BATCH_KEYS, "pipeline.stages", "data_types.keep_in_fp32_modules"})
# numbers there must agree with the training config: DeepSpeed's would silently win over it
TIED = frozenset({"optimizer.params.lr", "optimizer.params.weight_decay", "scheduler.params.warmup_max_lr",
                  "scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps"})
ORIGINS = {
    "optimizer.params.lr": "lr", "optimizer.params.weight_decay": "weight_decay",
    "optimizer.params.betas": "torch AdamW's default, as the engine's own optimizer",
    "optimizer.params.eps": "torch AdamW's default, as the engine's own optimizer",
    "scheduler.params.warmup_min_lr": "the schedule starts from 0", "scheduler.params.warmup_max_lr": "lr",
    "scheduler.params.warmup_num_steps": "warmup_ratio x steps, at least 1",
    "scheduler.params.total_num_steps": "steps", "bf16.enabled": "precision", "fp16.enabled": "fp16 is not supported",
    "zero_optimization.reduce_bucket_size": "hidden_size^2",
    "zero_optimization.stage3_prefetch_bucket_size": "0.9 x hidden_size^2",
    "zero_optimization.stage3_param_persistence_threshold": "10 x hidden_size",
}
HINTS = {
    "bf16.enabled": "set precision (bf16 or fp32) in the training config, or true/false here",
    "gradient_clipping": "the training config has no clipping setting: set a number here (0: no clipping)",
    **{f"zero_optimization.{key}": "the model has no Hugging Face hidden size to size it by: set a number"
       for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")},
}


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up steps of the training config's schedule: ceil(ratio x steps), at least 1 unless the ratio is 0."""
    return max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0


def training_values(cfg: TrainConfig, total_steps: int, hidden_size: int | None) -> dict[str, Any]:
    """What each key a DeepSpeed config may leave 'auto' takes from the training run (None: nothing to take)."""
    return {
        "optimizer.params.lr": cfg.lr,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": cfg.lr,
        # DeepSpeed's warm-up schedulers refuse 0 steps
        "scheduler.params.warmup_num_steps": max(1, warmup_steps(total_steps, cfg.warmup_ratio)),
        "scheduler.params.total_num_steps": total_steps,
        "bf16.enabled": {"bf16": True, "fp32": False}.get(cfg.precision or ""),
        "fp16.enabled": False,
        # None: a model that is not a Hugging Face encoder has no hidden size to size them by
        "zero_optimization.reduce_bucket_size": hidden_size and hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": hidden_size and int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": hidden_size and 10 * hidden_size,
    }


def auto_values(config: dict[str, Any], cfg: TrainConfig, total_steps: int, hidden_size: int | None,
                source: str | Path) -> dict[str, Any]:
    """The value of each 'auto' in ``config`` (dotted key -> value); ConfigError for one that cannot be resolved."""
    known = training_values(cfg, total_steps, hidden_size)
    values = {}
    for key in _auto_keys(config):
        if known.get(key) is None:
            hint = HINTS.get(key, "set a value")
            raise ConfigError(f"{source}: {key} is 'auto', which ds_contrastive cannot resolve: {hint}")
        values[key] = known[key]
    return values


def resolve_auto(config: dict[str, Any], cfg: TrainConfig, total_steps: int, hidden_size: int | None,
                 source: str | Path) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """``config`` with its 'auto' values resolved, and the (dotted key, value) pairs resolved, in config order.

    Numbers at keys the training config also sets (learning rate, weight
    decay, warm-up and total steps) must agree with it, else ConfigError.
    """
    known = training_values(cfg, total_steps, hidden_size)
    for key in TIED:
        value = _get(config, key)
        if isinstance(value, (int, float)) and not math.isclose(value, known[key], rel_tol=1e-9, abs_tol=0.0):
            raise ConfigError(f"{source}: {key}={value!r}, but the training config gives {known[key]!r} "
                              f"({ORIGINS[key]}): make them agree, or set it 'auto'")
    values = auto_values(config, cfg, total_steps, hidden_size, source)
    return apply_values(config, values), list(values.items())


def format_resolved(resolved: list[tuple[str, Any]], source: str | Path) -> str:
    """The resolved values as lines to print at start, each with where it came from."""
    if not resolved:
        return f"{source}: no 'auto' values to resolve"
    lines = [f"{source}: 'auto' values resolved from the training config and the model:"]
    lines += [f"  {key} = {value!r}  ({ORIGINS[key]})" for key, value in resolved]
    return "\n".join(lines)


def apply_values(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with each dotted key set to its value."""
    out = copy.deepcopy(config)
    for key, value in values.items():
        *path, last = key.split(".")
        section = out
        for part in path:
            section = section[part]
        section[last] = value
    return out


def _auto_keys(config: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value is 'auto', except the engine's batch keys and DeepSpeed's own 'auto' values."""
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{dotted}.")
        elif value == "auto" and dotted not in NOT_PLACEHOLDERS:
            keys.append(dotted)
    return keys


def _get(config: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key``, or None."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config
