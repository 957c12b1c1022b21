"""The script behind ``launch/train_hf.py``: sentence-transformers' training arguments plus ds_contrastive's loss.

Every ``SentenceTransformerTrainingArguments`` option (``--deepspeed``,
``--per_device_train_batch_size``, ``--learning_rate``, ``--report_to``,
``--save_steps``, ``--resume_from_checkpoint`` ...) is parsed by
``HfArgumentParser``, next to :class:`ContrastiveArguments` (model, data,
loss, chunking). ``--help`` lists both with their defaults. Without
``--train_data`` (the built-in pairs) it runs a short demo:
:data:`DEMO_DEFAULTS` unless given.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from ..core.runtime import share_cpu_threads, shutdown, skip_shm_comm_op
from ..data.mixture import by_role
from ..run.config import RefusingParser
from ..run.console import clean_errors, quiet_other_ranks
from ..run.options import ChunkingOptions, DataOptions, LossOptions, ModelOptions
from ..run.setup import build_loss, build_model, load_eval_data, load_train_data, step_options


@dataclass
class ContrastiveArguments(ChunkingOptions, LossOptions, DataOptions, ModelOptions):  # --help: model first
    """What to train on and with which loss; the Trainer's own options come from its arguments.

    Every field is a shared option group of :mod:`~ds_contrastive.run.options`,
    the same as ``launch/train.py``'s (the Trainer has no learnable temperature).
    """


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
    if not any(arg == "--train_data" or arg.startswith("--train_data=") for arg in given):
        parser.set_defaults(**DEMO_DEFAULTS)
    # ConfigError: the shared options' check, or a bad command line
    training_args, args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.eval_data in ("none", ""):
        args.eval_data = None
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
    data = load_train_data(args)  # the Trainer reads the columns in order: anchor, positive, negatives
    data = by_role(data, args.anchor_column, args.positive_column, args.query_prefix, args.document_prefix)
    eval_pairs = load_eval_data(args)
    model, _ = build_model(args, training_args.seed)
    trainer = ContrastiveTrainer(
        model=model, args=training_args, train_dataset=Dataset.from_dict(data), loss=build_loss(args),
        evaluator=retrieval_evaluator(eval_pairs) if eval_pairs else None, save_adapter_only=args.save_adapter_only,
        **step_options(args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if eval_pairs:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            print({k: round(v, 4) for k, v in metrics.items() if "heldout" in k}, flush=True)
    shutdown()

