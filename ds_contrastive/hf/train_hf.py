"""The script behind ``launch/train_hf.py``: sentence-transformers' training arguments plus ds_contrastive's loss.

Every ``SentenceTransformerTrainingArguments`` option (``--deepspeed``,
``--per_device_train_batch_size``, ``--learning_rate``, ``--report_to``,
``--save_steps``, ``--resume_from_checkpoint`` ...) is parsed by
``HfArgumentParser``, next to :class:`ContrastiveArguments` (model, data,
loss, chunking). ``--help`` lists both with their defaults. Without
``--train_data`` or ``--datasets`` (the built-in pairs) it runs a short demo:
:data:`DEMO_DEFAULTS` unless given.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.runtime import share_cpu_threads, shutdown, skip_shm_comm_op
from ..data.mixture import by_role
from ..errors import ConfigError
from ..run.config import RefusingParser, check_dataset_entry
from ..run.console import clean_errors, quiet_other_ranks
from ..run.options import BUILTIN_DATA, ChunkingOptions, DataOptions, LossOptions, ModelOptions, option
from ..run.setup import build_loss, build_model, load_eval_data, load_train_data, read_dataset_entry, step_options
from .batches import WeightedBatchSampler


@dataclass
class ContrastiveArguments(ChunkingOptions, LossOptions, DataOptions, ModelOptions):  # --help: model first
    """What to train on and with which loss; the Trainer's own options come from its arguments.

    Every field but ``datasets`` is a shared option group of
    :mod:`~ds_contrastive.run.options`, the same as ``launch/train.py``'s;
    ``datasets`` takes ``launch/train.py``'s entries as JSON (a command line
    has no YAML lists).
    """

    datasets: str | None = option(
        None, "several datasets instead of train_data: a JSON list of launch/train.py's datasets entries (path, name, "
              "weight, anchor_column, positive_column, negative_columns, query_prefix, document_prefix, "
              "max_examples), or a .json/.yaml file holding one. Every global batch comes from one dataset: drawn by "
              "weight when an entry has one, else in --multi_dataset_batch_sampler's order")


def dataset_entries(value: str) -> list[dict[str, Any]]:
    """``--datasets``: the JSON list itself, or a .json/.yaml file holding it; each entry checked, names unique."""
    path = Path(value)
    try:
        if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
            entries = yaml.safe_load(path.read_text())  # JSON is YAML
        else:
            entries = json.loads(value)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--datasets: neither a JSON list nor a readable .json/.yaml file ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--datasets must be a non-empty list of entries, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        check_dataset_entry(i, entry)
    names = [entry.get("name", Path(entry["path"]).stem) for entry in entries]
    if len(set(names)) < len(names):
        raise ConfigError(f"--datasets: names must be unique (a file's stem unless named), got {names}")
    return entries


def load_datasets(args: ContrastiveArguments, training_args: Any) -> Any:
    """``--datasets`` as a DatasetDict (columns renamed to roles, prefixes applied), and their weighted draw if any."""
    from datasets import Dataset, DatasetDict

    entries = [read_dataset_entry(entry, args) for entry in dataset_entries(args.datasets)]
    weights = [entry.weight for entry in entries]
    if any(w is not None for w in weights):  # launch/train.py's mixture draw, in place of the sampler argument
        training_args.multi_dataset_batch_sampler = functools.partial(
            WeightedBatchSampler, weights=[1.0 if w is None else w for w in weights])
    return DatasetDict({entry.name: Dataset.from_dict(by_role(entry.data, entry.anchor_column, entry.positive_column,
                                                              entry.query_prefix, entry.document_prefix))
                        for entry in entries})


def retrieval_evaluator(pairs: dict[str, list[str]]):
    """sentence-transformers' InformationRetrievalEvaluator: each anchor's own positive is its one relevant doc."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    ids = [str(i) for i in range(len(pairs["anchor"]))]
    return InformationRetrievalEvaluator(
        queries=dict(zip(ids, pairs["anchor"])), corpus=dict(zip(ids, pairs["positive"])),
        relevant_docs={i: {i} for i in ids}, name="heldout", accuracy_at_k=[1, 10], precision_recall_at_k=[1, 10],
        mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[10], show_progress_bar=False)


# On the built-in data, unless the command line says otherwise: a short demo (like the quickstart) rather
# than the Trainer's 3 epochs of 8 rows per device (~470 steps on 2 CPU ranks).
DEMO_DEFAULTS = {"max_steps": 16, "per_device_train_batch_size": 32, "max_length": 64}


def parse(argv: list[str] | None = None):
    """(SentenceTransformerTrainingArguments, ContrastiveArguments) from the command line."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from transformers import HfArgumentParser

    class Parser(RefusingParser, HfArgumentParser):
        pass

    skip_shm_comm_op()  # the arguments start the process group (DeepSpeed's, under --deepspeed)
    parser = Parser((SentenceTransformerTrainingArguments, ContrastiveArguments))
    # Without a GPU, accelerate counts one process under the deepspeed launcher unless told the run is on CPU.
    parser.set_defaults(use_cpu=not torch.cuda.is_available(), output_dir="outputs/train_hf")
    given = sys.argv[1:] if argv is None else argv
    if not any(arg.split("=")[0] in ("--train_data", "--datasets") for arg in given):
        parser.set_defaults(**DEMO_DEFAULTS)
    # ConfigError: the shared options' check, or a bad command line
    training_args, args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.eval_data in ("none", ""):
        args.eval_data = None
    if args.datasets and args.train_data != BUILTIN_DATA:
        raise ConfigError("set --train_data or --datasets, not both")
    return training_args, args


def main(argv: list[str] | None = None) -> None:
    """Parse, load model and data, train with the Trainer, save; print held-out retrieval at the end.

    A mistake in the options or the data ends the run with one ``error:``
    line and its exit code, as ``launch/train.py`` does
    (:mod:`~ds_contrastive.run.console`; ``DS_CONTRASTIVE_DEBUG=1`` shows the
    traceback: the Trainer's own ``--debug`` means something else).
    """
    quiet_other_ranks()
    share_cpu_threads()
    with clean_errors():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import Dataset

    from .trainer import ContrastiveTrainer

    training_args, args = parse(argv)
    if args.datasets:
        train_dataset = load_datasets(args, training_args)
    else:  # the Trainer reads the columns in order: anchor, positive, negatives
        data = load_train_data(args)
        train_dataset = Dataset.from_dict(
            by_role(data, args.anchor_column, args.positive_column, args.query_prefix, args.document_prefix))
    eval_pairs = load_eval_data(args)
    model, _ = build_model(args, training_args.seed)
    trainer = ContrastiveTrainer(
        model=model, args=training_args, train_dataset=train_dataset, loss=build_loss(args),
        evaluator=retrieval_evaluator(eval_pairs) if eval_pairs else None, save_adapter_only=args.save_adapter_only,
        **step_options(args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if eval_pairs:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            print({k: round(v, 4) for k, v in metrics.items() if "heldout" in k}, flush=True)
    shutdown()

