"""What the installed DeepSpeed reads from a config: its keys, their types, and its own refusals.

DeepSpeed ignores top-level keys it does not know (a misspelt section runs
without it) and finds most other mistakes only inside ``deepspeed.initialize``,
after the data and the model have loaded, with an assertion or a pydantic
dump. :func:`check_ds_config` asks DeepSpeed's own knowledge (its config
reader, constants and pydantic models) up front and names the file and key.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import pydantic
import torch

from ..errors import ConfigError
from .loading import BATCH_KEYS, did_you_mean

# read by deepspeed.initialize, outside the DeepSpeedConfig reader whose lookups are recorded
LAUNCH_KEYS = frozenset({"sequence_parallel_size", "data_parallel_size"})
# top-level scalars the HF Trainer integration lets a config leave "auto"
HF_AUTO_SCALARS = frozenset({*BATCH_KEYS, "gradient_clipping"})
MUP_OPTIMIZERS = frozenset({"muadam", "muadamw", "musgd"})


def check_ds_config(config: dict[str, Any], source: str | Path) -> None:
    """Keys, types and combinations DeepSpeed would refuse or ignore; ``'auto'`` stays where DeepSpeed or HF allow it."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a DeepSpeed config must be a JSON object, got {type(config).__name__}")
    known = deepspeed_top_level_keys()
    for key, value in config.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown DeepSpeed key {key!r}{did_you_mean(key, known)}")
        _check_scalar(key, value, source)
    if "bfloat16" in config:
        raise ConfigError(f"{source}: 'bfloat16' is DeepSpeed's old spelling of 'bf16', which is the one ds_contrastive "
                          "reads (precision, --precision): rename it")
    for section in _section_models():
        if section in config and not isinstance(config[section], dict):
            raise ConfigError(f"{source}: {section} must be a mapping, got {config[section]!r}")
    _check_optimizer_section(config.get("optimizer"), source)
    _check_scheduler_section(config.get("scheduler"), source)
    _deepspeed_accepts(config, source)


@functools.cache
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed's config reader looks up.

    DeepSpeed keeps no list of its keys; recording what ``DeepSpeedConfig``
    asks of a minimal config (it looks up each key, present or not) follows
    the installed version exactly, removed keys included (DeepSpeed's own
    check then explains those).
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    asked: set[str] = set()

    class Recording(dict):
        def get(self, key: str, default: Any = None) -> Any:
            asked.add(key)
            return super().get(key, default)

        def __contains__(self, key: object) -> bool:
            asked.add(str(key))
            return super().__contains__(key)

        def __getitem__(self, key: str) -> Any:
            asked.add(key)
            return super().__getitem__(key)

        def keys(self) -> Recording:  # "key in config.keys()" is recorded too
            return self

        def __copy__(self) -> Recording:
            return self

    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return frozenset(asked | LAUNCH_KEYS)


@functools.cache
def _scalar_types() -> dict[str, type]:
    """Top-level scalar keys whose DeepSpeed default (runtime/constants.py) is a bool or a number: their type."""
    from deepspeed.runtime import constants

    names = vars(constants)
    types = {}
    for name, key in names.items():
        default = names.get(f"{name}_DEFAULT")
        if isinstance(key, str) and key in deepspeed_top_level_keys() and isinstance(default, (bool, int, float)):
            types[key] = bool if isinstance(default, bool) else float
    return types


def _check_scalar(key: str, value: Any, source: str | Path) -> None:
    """A top-level bool or number of the right type (JSON "false" as a string would read as true)."""
    want = _scalar_types().get(key)
    if want is None or (value == "auto" and key in HF_AUTO_SCALARS):
        return
    if want is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if want is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")


@functools.cache
def _section_models() -> dict[str, type[pydantic.BaseModel]]:
    """The sections DeepSpeed reads with a pydantic model, and that model."""
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config, "fp16": DeepSpeedFP16Config,
            "tensorboard": TensorBoardConfig, "wandb": WandbConfig, "csv_monitor": CSVConfig, "comet": CometConfig,
            "compile": CompileConfig, "comms_logger": CommsLoggerConfig}


def _readable(error: Any, section: str, model: type[pydantic.BaseModel]) -> str:
    """One pydantic error of a section as 'section.key: what is wrong', with a guess for a misspelt key."""
    where = ".".join([section, *map(str, error["loc"])])
    if error["type"] == "extra_forbidden":
        return f"unknown key {where!r}{did_you_mean(str(error['loc'][-1]), _field_names(model))}"
    shown = error.get("input")
    got = f" (got {shown!r})" if isinstance(shown, (str, int, float, bool, list)) and error["loc"] else ""
    return f"{where}: {error['msg']}{got}"


def _field_names(model: type[pydantic.BaseModel]) -> set[str]:
    """The names and aliases of a model's fields and of the models nested in it."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.update(n for n in (name, field.alias) if n)
        for inner in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel):
                names |= _field_names(inner)
    return names


def _check_optimizer_section(section: Any, source: str | Path) -> None:
    """A mapping with a ``type`` DeepSpeed can build (its own names or a torch.optim class) and mapping ``params``."""
    if section is None:
        return
    _check_keys(section, "optimizer", {"type", "params", "legacy_fusion"}, source)
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    name = section.get("type")
    torch_names = {n for n, c in vars(torch.optim).items()
                   if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    if not isinstance(name, str) or (name.lower() not in DEEPSPEED_OPTIMIZERS and name not in torch_names):
        import deepspeed

        raise ConfigError(f"{source}: optimizer.type={name!r} is not an optimizer DeepSpeed {deepspeed.__version__} "
                          f"builds (its own: {', '.join(DEEPSPEED_OPTIMIZERS)}; or a torch.optim class)"
                          f"{did_you_mean(str(name), {*DEEPSPEED_OPTIMIZERS, *torch_names})}")
    if name.lower() in MUP_OPTIMIZERS and importlib.util.find_spec("mup") is None:
        raise ConfigError(f"{source}: optimizer.type={name!r} needs the 'mup' package, which is not installed")


def _check_scheduler_section(section: Any, source: str | Path) -> None:
    """A mapping with a ``type`` DeepSpeed finds (its lr_schedules or torch's) and ``params`` that type takes."""
    if section is None:
        return
    _check_keys(section, "scheduler", {"type", "params"}, source)
    from deepspeed.runtime import lr_schedules

    name = section.get("type")
    found = getattr(lr_schedules, str(name), None) or getattr(torch.optim.lr_scheduler, str(name), None)
    if not isinstance(name, str) or not isinstance(found, type):
        raise ConfigError(f"{source}: scheduler.type={name!r} is not a DeepSpeed or torch LR scheduler"
                          f"{did_you_mean(str(name), lr_schedules.VALID_LR_SCHEDULES)}")
    takes = inspect.signature(found).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        accepted = set(takes) - {"optimizer"}
        for key in section.get("params", {}):
            if key not in accepted:
                raise ConfigError(f"{source}: scheduler.params.{key} is not a parameter of {name} (it takes "
                                  f"{', '.join(sorted(accepted))}){did_you_mean(key, accepted)}")


def _check_keys(section: Any, name: str, allowed: set[str], source: str | Path) -> None:
    """A mapping with only ``allowed`` keys, a ``type``, and ``params`` (if any) a mapping."""
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {name} must be a mapping, got {section!r}")
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'{did_you_mean(key, allowed)}")
    if "type" not in section:
        raise ConfigError(f"{source}: {name} has no 'type'")
    if not isinstance(section.get("params", {}), dict):
        raise ConfigError(f"{source}: {name}.params must be a mapping, got {section['params']!r}")


def _deepspeed_accepts(config: dict[str, Any], source: str | Path) -> None:
    """Run DeepSpeed's own config reader and sanity checks on ``config`` with its HF-style 'auto' values left out."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    probe = {k: v for k, v in config.items() if not (k in HF_AUTO_SCALARS and v == "auto") and k != "train_batch_size"}
    probe.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as e:
        raise ConfigError(f"{source}: {_named(e)}") from None
    except (AssertionError, ValueError, TypeError, DeepSpeedConfigError) as e:
        raise ConfigError(f"{source}: DeepSpeed refuses it: {e}") from None


def _named(e: pydantic.ValidationError) -> str:
    """DeepSpeed's first validation error, named by section and key (``'auto'`` values were left out before)."""
    error, models = e.errors()[0], _section_models()
    by_model = {model.__name__: section for section, model in models.items()}
    if e.title in by_model:  # a section read with its own model: the location starts inside it
        return _readable(error, by_model[e.title], models[by_model[e.title]])
    if error["loc"] and error["loc"][0] in models:  # the monitors, read as one model: the location names the section
        return _readable({**error, "loc": error["loc"][1:]}, str(error["loc"][0]), models[error["loc"][0]])
    return f"DeepSpeed refuses it: {e.title}: {'.'.join(map(str, error['loc']))}: {error['msg']}"
