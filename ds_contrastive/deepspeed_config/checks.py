"""Checking a DeepSpeed config against the training config at start, before the data and the model load.

The checks are pure and rank-independent: they name the file and the key,
and say what to change. They refuse what DeepSpeed itself would refuse only
inside ``deepspeed.initialize``, and what it would silently run otherwise
than the two configs say (an ignored offload, a dropped LR schedule, batch
sizes that contradict the data's).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .auto import apply_values, auto_values
from .loading import BATCH_KEYS, refuse_accumulation, resolve_ds_config, zero_stage
from .schema import MUP_OPTIMIZERS, check_ds_config

if TYPE_CHECKING:
    from ..run.config import TrainConfig

# optimizers DeepSpeed builds itself whose classes are not in ZERO_SUPPORTED_OPTIMIZERS
# (engine._configure_basic_optimizer: lamb -> FusedLamb, mu* -> mup's classes)
ZERO_UNTESTED = MUP_OPTIMIZERS | {"lamb"}
SCHEDULER_SUGGESTION = ('"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": '
                        '"auto", "warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_type": "linear"}}')


def check_start(config: dict[str, Any], cfg: TrainConfig, world_size: int, source: str | Path) -> dict[str, Any]:
    """Every check of a DeepSpeed config against the training config; return the copy to resolve and train with.

    Its batch keys come back ``'auto'`` (the engine sets DeepSpeed's own); its
    other ``'auto'`` values are only checked to be resolvable here, they are
    resolved by :func:`~ds_contrastive.deepspeed_config.auto.resolve_auto` once the step
    count and the model are known.
    """
    check_ds_config(config, source)
    check_zero_optimizer(config, source)
    check_schedule(config, source)
    checked = check_batch_keys(config, cfg.global_batch_size, world_size, source)
    resolvable = apply_values(checked, auto_values(checked, cfg, 1, 1, source))
    try:  # the engine's own refusals, early
        resolve_ds_config(resolvable, world_size)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return checked


def check_batch_keys(config: dict[str, Any], global_batch_size: int, world_size: int,
                     source: str | Path) -> dict[str, Any]:
    """DeepSpeed's batch keys, counted in examples, against the training config; return a copy with them ``'auto'``.

    ``train_batch_size`` must be ``global_batch_size`` and
    ``train_micro_batch_size_per_gpu`` each rank's share of it (which exists
    only when the ranks' shards are equal: the data gives the first ranks one
    row more otherwise).
    """
    values = {key: config.get(key, "auto") for key in BATCH_KEYS}
    for key, value in values.items():
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{source}: {key} must be a whole number >= 1 or 'auto', got {value!r}")
    try:
        refuse_accumulation(values["gradient_accumulation_steps"])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if global_batch_size < world_size:
        raise ConfigError(f"global_batch_size={global_batch_size} is smaller than the {world_size} ranks: every rank "
                          "needs at least one example per step")
    total, micro = values["train_batch_size"], values["train_micro_batch_size_per_gpu"]
    if total != "auto" and micro != "auto" and total != micro * world_size:
        raise ConfigError(f"{source}: train_batch_size={total} is not train_micro_batch_size_per_gpu={micro} x "
                          f"gradient_accumulation_steps=1 x {world_size} ranks = {micro * world_size}")
    if total != "auto" and total != global_batch_size:
        raise ConfigError(f"{source}: train_batch_size={total}, but the training config's global_batch_size="
                          f"{global_batch_size}: make them equal or leave train_batch_size 'auto'")
    if micro != "auto" and global_batch_size % world_size:
        raise ConfigError(f"{source}: train_micro_batch_size_per_gpu={micro}, but global_batch_size="
                          f"{global_batch_size} over {world_size} ranks gives shards of unequal size: leave it 'auto'")
    if micro != "auto" and micro * world_size != global_batch_size:
        raise ConfigError(f"{source}: train_micro_batch_size_per_gpu={micro} x {world_size} ranks is not the training "
                          f"config's global_batch_size={global_batch_size}: set {global_batch_size // world_size} "
                          "or 'auto'")
    return {**config, **{key: "auto" for key in BATCH_KEYS}}


def check_zero_optimizer(config: dict[str, Any], source: str | Path) -> None:
    """The ZeRO stage, offload and optimizer combinations DeepSpeed refuses at initialize, or runs otherwise than set."""
    zero = config.get("zero_optimization", {})
    stage = zero_stage(config)
    offload_optimizer, offload_param = _offloads(zero, "offload_optimizer"), _offloads(zero, "offload_param")
    if offload_param and stage != 3:
        raise ConfigError(f"{source}: zero_optimization.offload_param needs ZeRO stage 3 (stage {stage} does not "
                          "partition parameters; DeepSpeed would ignore it): use stage 3 or remove it")
    if offload_optimizer and stage == 0:
        raise ConfigError(f"{source}: zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage 0 neither "
                          "partitions nor offloads the optimizer)")
    name = config.get("optimizer", {}).get("type")
    if name is None:  # the engine's own torch AdamW
        if offload_optimizer and config.get("zero_force_ds_cpu_optimizer", True):
            raise ConfigError(
                f"{source}: ZeRO-Offload with the engine's torch AdamW (no 'optimizer' section) is refused by "
                "DeepSpeed while zero_force_ds_cpu_optimizer is true: add an 'optimizer' section (DeepSpeed then "
                "builds its CPU Adam) or set \"zero_force_ds_cpu_optimizer\": false")
        return
    if stage > 0 and not config.get("zero_allow_untested_optimizer", False) and not _zero_supports(name):
        raise ConfigError(f"{source}: optimizer {name!r} is not one DeepSpeed's ZeRO supports: use adam, adamw, "
                          "adagrad, lion or muon, or set \"zero_allow_untested_optimizer\": true")


def check_schedule(config: dict[str, Any], source: str | Path) -> None:
    """Refuse an LR schedule that would be silently dropped.

    Without an ``optimizer`` section the engine builds AdamW and passes the
    training config's schedule, which DeepSpeed prefers to a ``scheduler``
    section (engine._configure_lr_scheduler). With one, the engine passes no
    scheduler, so only a ``scheduler`` section schedules the learning rate.
    """
    if "scheduler" in config and "optimizer" not in config:
        raise ConfigError(f"{source}: the 'scheduler' section would be ignored: without an 'optimizer' section the "
                          "engine builds AdamW with the training config's schedule (warmup_ratio, then linear decay) "
                          "and DeepSpeed uses that one. Remove the scheduler section, or add an optimizer section")
    if "optimizer" in config and "scheduler" not in config:
        raise ConfigError(f"{source}: with an 'optimizer' section DeepSpeed builds the optimizer and the training "
                          "config's schedule (warmup_ratio, linear decay) is not applied: the learning rate would stay "
                          f"constant. Add {SCHEDULER_SUGGESTION} (its 'auto' values come from the training config), "
                          "or remove the optimizer section")


def _offloads(zero: dict[str, Any], key: str) -> bool:
    """Whether the ZeRO section's ``key`` (offload_optimizer / offload_param) moves anything off the device."""
    return str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")


def _zero_supports(name: str) -> bool:
    """Whether the optimizer DeepSpeed builds for config type ``name`` is in its ZERO_SUPPORTED_OPTIMIZERS."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    if name.lower() in DEEPSPEED_OPTIMIZERS:
        return name.lower() not in ZERO_UNTESTED
    return getattr(torch.optim, name) in ZERO_SUPPORTED_OPTIMIZERS
