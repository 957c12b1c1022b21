"""The training configuration of ``launch/train.py``: a YAML file plus command-line overrides.

Every key is a field of :class:`TrainConfig`; each can be overridden on the
command line as ``--key value`` (lists comma-separated). Unknown keys and
values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..configs import config_file, shipped_names
from ..deepspeed_config.loading import did_you_mean
from ..errors import ConfigError
from .options import BUILTIN_DATA, ChunkingOptions, DataOptions, LossOptions, ModelOptions, option

EVAL_METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")  # what the held-out evaluation reports


@dataclass
class TrainConfig(ChunkingOptions, LossOptions, DataOptions, ModelOptions):  # --help: model, data, loss, chunking
    """What to train, on what, and how. Defaults give the built-in quickstart.

    The model, data, loss and chunking options come from
    :mod:`~ds_contrastive.run.options` (shared with ``launch/train_hf.py``);
    the rest are this script's own.
    """

    datasets: list[dict[str, Any]] = option([], "several datasets instead of train_data, each a mapping (path, name, "
                                                "weight, columns, prefixes)")
    streaming: bool = option(False, "read train_data (JSONL/Parquet) as a stream: memory bounded whatever its size")
    stream_window_batches: int = option(16, "streaming: global batches shuffled together (memory grows with it)")
    max_bad_rows: int = option(0, "streaming: bad rows each rank may skip (counted) before it stops with an error")
    eval_every_steps: int | None = option(None, "also evaluate every N steps (all ranks), keeping the best model in "
                                                "output_dir/best")
    best_metric: str = option("ndcg@10", "what picks the best model: recall@1, recall@10, mrr@10 or ndcg@10")
    global_batch_size: int = option(64, "examples per optimizer step, over all ranks")
    epochs: int = option(1, "passes over the training data (max_steps, when set, stops earlier)")
    max_steps: int | None = option(None, "stop after this many steps (default: epochs x steps per epoch)")
    lr: float = option(5e-5, "peak learning rate of AdamW")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "linear warm-up over this fraction of the steps, then linear decay to 0")
    max_nonfinite_steps: int = option(10, "consecutive steps with a non-finite loss (each skipped) that stop training")
    precision: str | None = option(None, "'bf16' or 'fp32' overrides the DeepSpeed config's bf16 section")
    seed: int = option(42, "seed of the data order and of the dropout masks")
    output_dir: str = option("outputs/quickstart", "where the model, metrics.jsonl, summary.json and checkpoints are "
                                                   "written (one holding another run is refused)")
    overwrite_output_dir: bool = option(False, "replace the run already in output_dir: its model, metrics, "
                                               "checkpoints and report are removed first")
    checkpoint_every_steps: int | None = option(None, "write a resumable checkpoint (output_dir/checkpoints) every N "
                                                      "steps")
    checkpoint_every_minutes: float | None = option(None, "write a checkpoint every M minutes too (all ranks' "
                                                          "clocks agree)")
    keep_checkpoints: int = option(2, "newest checkpoints kept; older ones are deleted after each save")
    resume: str | None = option(None, "'auto': continue from the newest checkpoint in output_dir, if any; or a "
                                      "checkpoint path")
    collective_timeout_seconds: float = option(1800.0, "a rank that waits this long for the others stops with an error")
    wandb: bool = option(False, "log to Weights & Biases (WANDB_MODE=offline works without a network)")
    wandb_project: str = option("ds-contrastive", "the W&B project")
    wandb_run_name: str | None = option(None, "the W&B run name (default: W&B's)")
    wandb_tags: list[str] = option([], "W&B tags")
    progress_bar: bool = option(True, "rank 0's progress bar")
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward (non-reentrant, "
                                                 "same dropout masks): less memory per chunk, the same gradients")

    def check(self) -> None:
        """Reject values that cannot work, naming the key."""
        positive = ("global_batch_size", "epochs", "max_nonfinite_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_examples", "eval_pairs", "chunk_tokens", "chunk_rows", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value}")
        if self.streaming and (self.datasets or self.train_data == BUILTIN_DATA or self.max_steps is None):
            raise ConfigError("streaming reads one train_data file and needs max_steps (its length is not known "
                              "ahead); it does not combine with datasets or the built-in data")
        if self.stream_window_batches < 1 or self.max_bad_rows < 0:
            raise ConfigError("stream_window_batches must be >= 1 and max_bad_rows >= 0")
        if self.datasets and self.train_data != BUILTIN_DATA:
            raise ConfigError("set train_data or datasets, not both")
        for i, entry in enumerate(self.datasets):
            check_dataset_entry(i, entry)
        if self.chunk_tokens is None and self.chunk_rows is None:
            raise ConfigError("set chunk_tokens, chunk_rows, or both")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in (None, "bf16", "fp32"):
            raise ConfigError(f"precision must be 'bf16', 'fp32' or null, got {self.precision!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ConfigError(f"checkpoint_every_steps must be >= 1 or null, got {self.checkpoint_every_steps}")
        for name in ("checkpoint_every_minutes", "collective_timeout_seconds"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.eval_every_steps is not None and (self.eval_every_steps < 1 or self.eval_data is None):
            raise ConfigError(f"eval_every_steps must be >= 1 and needs eval_data, got {self.eval_every_steps} "
                              f"with eval_data={self.eval_data!r}")
        if self.best_metric not in EVAL_METRICS:
            raise ConfigError(f"best_metric must be one of {', '.join(EVAL_METRICS)}, got {self.best_metric!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.resume is not None and not self.resume.strip():
            raise ConfigError("resume must be 'auto', a checkpoint directory, or null")
        if self.resume is not None and self.overwrite_output_dir:
            raise ConfigError("resume continues the run in output_dir and overwrite_output_dir replaces it: set one")


DATASET_KEYS: dict[str, Any] = {
    "path": str, "name": str, "weight": float, "anchor_column": str, "positive_column": str,
    "negative_columns": list, "query_prefix": str, "document_prefix": str, "max_examples": int,
}


def check_dataset_entry(index: int, entry: Any) -> None:
    """One ``datasets`` entry: a mapping with a ``path`` and only known keys of the right types."""
    where = f"datasets[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping (path, weight, columns, prefixes), got {type(entry).__name__}")
    if "path" not in entry:
        raise ConfigError(f"{where} has no 'path'")
    for key, value in entry.items():
        if key not in DATASET_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, DATASET_KEYS)}")
        want = DATASET_KEYS[key]
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if want is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            raise ConfigError(f"{where}.{key} must be {'a number > 0' if want is float else want.__name__}"
                              f"{' of strings' if want is list else ''}, got {value!r}")


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` (from YAML or the command line) to the field's type, or raise ConfigError."""
    args = typing.get_args(hint)
    if hint == list[dict[str, Any]]:  # datasets: YAML list of mappings, or JSON on the command line
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key} on the command line must be JSON: {e}") from None
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of mappings, got {type(value).__name__}")
        return value
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        error = None
        for inner in (a for a in args if a is not type(None)):  # the first type the value converts to
            try:
                return _coerce(key, value, inner)
            except ConfigError as e:
                error = error or e
        raise error
    if typing.get_origin(hint) is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(key, v.strip() if isinstance(v, str) else v, args[0]) for v in items if v != ""]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    try:
        if hint is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}") from None


def load_train_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The YAML file's values (if any), then the command-line ``overrides`` on top."""
    values: dict[str, Any] = {}
    if path is not None:
        path = config_file(path, "train", "training config")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"training config {path} must be a mapping of keys to values")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = _field_types()
    for key in values:
        if key not in hints:
            raise ConfigError(f"unknown training config key {key!r}{did_you_mean(key, hints)}")
    config = TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    config.check()
    return config


class RefusingParser:
    """An argparse parser mixin: a bad command line raises a ConfigError (printed once, not once per rank)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (--help lists the options)")


class _Parser(RefusingParser, argparse.ArgumentParser):
    pass


def argument_parser() -> argparse.ArgumentParser:
    """``--config``, ``--deepspeed_config``, ``--debug`` and one ``--KEY`` per TrainConfig field."""
    parser = _Parser(description="Contrastive training of a text embedder on DeepSpeed.")
    parser.add_argument("--config", metavar="VALUE",
                        help="training config: a YAML file, or the name of a shipped one "
                             f"({', '.join(shipped_names('train'))}); command-line keys override it. default: None")
    parser.add_argument("--deepspeed_config", default="zero2", metavar="VALUE",
                        help="DeepSpeed config: a JSON file, or the name of a shipped one "
                             f"({', '.join(shipped_names('deepspeed'))}). default: %(default)r")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error, not only its message (also: DS_CONTRASTIVE_DEBUG=1)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    defaults, hints = TrainConfig(), _field_types()
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name}", default=None, metavar="VALUE",
                            help=f"{f.metadata['help']}{list_syntax(hints[f.name])}. default: "
                                 f"{getattr(defaults, f.name)!r}")
    return parser


def list_syntax(hint: Any) -> str:
    """How a list option is written on the command line (a YAML config takes YAML lists)."""
    if hint == list[dict[str, Any]]:
        return """ (on the command line: JSON, e.g. '[{"path": "a.jsonl", "weight": 2}]')"""
    if typing.get_origin(hint) is list:
        return " (on the command line: comma-separated, e.g. a,b)"
    return ""


SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|apikey|token|secret|password|passwd|credentials?|(secret|private|access)"
                        r"[_-]?key)$", re.IGNORECASE)


def redacted(value: Any) -> Any:
    """``value`` with every mapping entry whose key names a secret (api_key, token, password, ...) masked.

    Configs are written to W&B and into checkpoints; a DeepSpeed config may
    carry a monitor's API key. The original is not changed.
    """
    if isinstance(value, dict):  # a number is no credential (the planner's cost per "token" is one)
        return {k: "<redacted>" if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "") and not
                (isinstance(v, (int, float)) and not isinstance(v, bool)) else redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value
