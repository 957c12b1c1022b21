"""The script behind ``launch/train_hf.py``: sentence-transformers' training arguments plus ds_contrastive's loss.

Every ``SentenceTransformerTrainingArguments`` option (``--deepspeed``,
``--per_device_train_batch_size``, ``--learning_rate``, ``--report_to``,
``--save_steps``, ``--resume_from_checkpoint`` ...) is parsed by
``HfArgumentParser``, next to :class:`ContrastiveArguments` (model, data,
loss, chunking). ``--help`` lists both with their defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .chunking import check_planning, parse_retain
from .distributed import shutdown
from .train import build_loss, load_eval_data, load_model, load_train_data, step_options
from .train_config import BUILTIN_DATA, BUILTIN_MODEL


@dataclass
class ContrastiveArguments:
    """What to train on and with which loss; the Trainer's own options come from its arguments."""

    model: str = field(default=BUILTIN_MODEL, metadata={"help": "SentenceTransformer directory, or the packaged "
                                                                "all-MiniLM-L6-v2"})
    train_data: str = field(default=BUILTIN_DATA, metadata={"help": "JSONL/CSV/Parquet/save_to_disk path, or the "
                                                                    "built-in stdlib docstring pairs"})
    eval_data: str | None = field(default=BUILTIN_DATA, metadata={"help": "held-out (anchor, positive) pairs for "
                                                                          "an InformationRetrievalEvaluator; "
                                                                          "'none': no evaluator"})
    eval_pairs: int = field(default=300, metadata={"help": "most held-out pairs evaluated"})
    anchor_column: str = "anchor"
    positive_column: str = "positive"
    negative_columns: list[str] = field(default_factory=list, metadata={"help": "hard-negative columns"})
    max_train_examples: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    temperature: float = 0.05
    min_temperature: float = 0.01
    directions: list[str] = field(default_factory=lambda: ["query_to_doc"],
                                  metadata={"help": "query_to_doc query_to_query doc_to_query doc_to_doc"})
    partition: str = field(default="joint", metadata={"help": "joint or per_direction"})
    similarity: str = field(default="cosine", metadata={"help": "cosine or dot"})
    mask_duplicates: bool = True
    guide: str | None = field(default=None, metadata={"help": "guided (GIST) loss: a frozen guide model"})
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    guide_chunk_tokens: int = 16384
    matryoshka_dims: list[int] = field(default_factory=list, metadata={"help": "e.g. 384 256 128 64"})
    matryoshka_weights: list[float] = field(default_factory=list)
    chunk_tokens: int | None = field(default=16384, metadata={
        "help": "the most padded tokens in one encoder forward call (a memory cap)"})
    chunk_rows: int | None = field(default=None, metadata={"help": "the most sequences in one encoder forward call"})
    planner: str = field(default="fastest", metadata={
        "help": "chunk cuts: 'fastest' (least time measured on this machine) or 'fill' (fill to chunk_tokens)"})
    chunk_costs: list[float] = field(default_factory=list, metadata={
        "help": "fixed planner costs (call, token, attention seconds) instead of measured ones"})
    max_length: int | None = field(default=None, metadata={"help": "truncation (default: the model's)"})
    retain_tokens: str = field(default="auto", metadata={
        "help": "pass-1 graphs pass 2 reuses instead of re-running (exact; memory): 'auto', or padded tokens per rank"})
    retain_memory_fraction: float = field(default=0.5, metadata={
        "help": "retain_tokens auto: this fraction of the free memory (GPU: device; CPU: system / ranks)"})
    retain_memory_gb: float | None = field(default=None, metadata={
        "help": "retain_tokens auto: this many GiB per rank instead"})


def retrieval_evaluator(pairs: dict[str, list[str]]):
    """sentence-transformers' InformationRetrievalEvaluator: each anchor's own positive is its one relevant doc."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    ids = [str(i) for i in range(len(pairs["anchor"]))]
    return InformationRetrievalEvaluator(
        queries=dict(zip(ids, pairs["anchor"])), corpus=dict(zip(ids, pairs["positive"])),
        relevant_docs={i: {i} for i in ids}, name="heldout", accuracy_at_k=[1, 10], precision_recall_at_k=[1, 10],
        mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[10], show_progress_bar=False)


def parse(argv: list[str] | None = None):
    """(SentenceTransformerTrainingArguments, ContrastiveArguments) from the command line."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from transformers import HfArgumentParser

    parser = HfArgumentParser((SentenceTransformerTrainingArguments, ContrastiveArguments))
    # Without a GPU, accelerate counts one process under the deepspeed launcher unless told the run is on CPU.
    parser.set_defaults(use_cpu=not torch.cuda.is_available(), output_dir="outputs/train_hf")
    training_args, args = parser.parse_args_into_dataclasses(args=argv)
    if args.eval_data in ("none", ""):
        args.eval_data = None
    args.retain_tokens = parse_retain(args.retain_tokens)
    try:
        check_planning(args.planner, args.chunk_costs or None, args.retain_tokens, args.retain_memory_fraction,
                       args.retain_memory_gb)
    except ValueError as e:
        parser.error(str(e))
    return training_args, args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import Dataset

    from .hf_trainer import ContrastiveTrainer

    training_args, args = parse(argv)
    data = load_train_data(args)
    eval_pairs = load_eval_data(args)
    model = load_model(args.model)
    trainer = ContrastiveTrainer(
        model=model, args=training_args, train_dataset=Dataset.from_dict(data), loss=build_loss(args),
        evaluator=retrieval_evaluator(eval_pairs) if eval_pairs else None, **step_options(args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if eval_pairs:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            print({k: round(v, 4) for k, v in metrics.items() if "heldout" in k}, flush=True)
    shutdown()

