"""The options both training scripts take, declared once: one dataclass per group.

:class:`~ds_contrastive.run.config.TrainConfig` (``launch/train.py``) and
:class:`~ds_contrastive.hf.train_hf.ContrastiveArguments`
(``launch/train_hf.py``) inherit these groups, so an option written here
appears in both scripts' ``--help`` with its description. Each field's help
is in its metadata, which ``HfArgumentParser`` and the training config's
parser both read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.chunks import check_planning, parse_retain
from ..errors import ConfigError

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"
BUILTIN_DATA = "builtin:stdlib"


def option(default: Any, help: str) -> Any:
    """A field with a default (a fresh copy for lists) and its ``--help`` text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelOptions:
    model: str = option(BUILTIN_MODEL, "a SentenceTransformer directory, or the packaged all-MiniLM-L6-v2")
    lora_rank: int | None = option(None, "train LoRA adapters of this rank (peft) instead of every weight; the saved "
                                         "model has them merged")
    lora_alpha: float = option(16.0, "LoRA: each update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = option(0.0, "LoRA: dropout on each adapted layer's input")
    lora_target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"],
                                            "LoRA: the Linear modules adapted, by name (decoder LLMs' attention "
                                            "projections; BERT's are query, key, value)")
    append_eos: str = option("auto", "end every text with the tokenizer's EOS token, the saved tokenizer too: auto "
                                     "(a last-token-pooling model whose tokenizer does not already), true, false")
    save_adapter_only: bool = option(False, "LoRA: save the adapter alone (peft's files, naming the base model; "
                                            "SentenceTransformer(path) loads it with peft installed) instead of "
                                            "the merged model")


@dataclass
class DataOptions:
    train_data: str = option(BUILTIN_DATA, "JSONL/CSV/Parquet/save_to_disk path, or the built-in stdlib docstring "
                                           "pairs")
    eval_data: str | None = option(BUILTIN_DATA, "held-out (anchor, positive) pairs for retrieval metrics; "
                                                 "null/none: none")
    eval_pairs: int | None = option(None, "evaluate only the first N held-out pairs (default: all)")
    anchor_column: str = option("anchor", "the anchor (query) column")
    positive_column: str = option("positive", "the positive (document) column")
    negative_columns: list[str] = option([], "hard-negative columns")
    query_prefix: str = option("", "prepended to every anchor (query) only: an instruction such as 'Instruct: "
                                   "<task>\\nQuery: ' (held-out queries too; a datasets entry may set its own)")
    document_prefix: str = option("", "prepended to every positive and hard negative (held-out documents too)")
    max_train_examples: int | None = option(None, "use only the first N training examples")


@dataclass
class LossOptions:
    temperature: float = option(0.05, "softmax temperature of the similarities")
    learnable_temperature: bool = option(False, "train the temperature (its log-scale) with the model, not below "
                                                "min_temperature")
    min_temperature: float = option(0.01, "the lowest a learnable temperature may go")
    directions: list[str] = option(["query_to_doc"], "query_to_doc query_to_query doc_to_query doc_to_doc")
    partition: str = option("joint", "joint (one log-sum-exp over all directions) or per_direction")
    similarity: str = option("cosine", "cosine or dot")
    mask_duplicates: bool = option(True, "a candidate whose text equals the row's positive (or anchor) is no "
                                              "negative")
    loss_precision: str = option("fp32", "the loss's matrix products: fp32, tf32 (CUDA's) or bf16 (inputs rounded, "
                                         "fp32 accumulation and log-sum-exp; each logit within scale x 2^-8 of fp32's)")
    guide: str | None = option(None, "guided (GIST) loss: a frozen guide SentenceTransformer (path or builtin), or "
                                     "'self': the model's own embeddings of the step, no second model")
    margin_strategy: str = option("absolute", "guided: 'absolute' or 'relative'")
    margin: float = option(0.0, "guided: mask candidates the guide scores above sim(anchor, positive) - margin "
                                "(negative: only those above the positive, e.g. -0.1 as Qwen3-Embedding)")
    contrast_anchors: bool = option(True, "guided: anchor-anchor term over the global batch")
    contrast_positives: bool = option(True, "guided: positive-positive term over the global batch")
    guide_chunk_tokens: int = option(16384, "guided: padded tokens per guide forward call")
    matryoshka_dims: list[int] = option([], "e.g. 384,256,128,64; empty: no Matryoshka")
    matryoshka_weights: list[float] = option([], "one per dim; empty: all 1")


@dataclass
class ChunkingOptions:
    max_length: int | None = option(None, "truncation (default: the model's max_seq_length)")
    chunk_tokens: int | None = option(16384, "the most padded tokens in one encoder forward call (a memory cap)")
    chunk_rows: int | None = option(None, "the most sequences in one encoder forward call")
    planner: str = option("fastest", "chunk cuts: 'fastest' (least time measured on this machine) or 'fill' (fill "
                                     "to chunk_tokens)")
    chunk_costs: list[float] = option([], "fixed planner costs (call, token, attention seconds); empty: measured")
    retain_tokens: str = option("auto", "pass-1 graphs pass 2 reuses (exact; costs activations): 'auto', or padded "
                                        "tokens per rank")
    retain_memory_fraction: float = option(0.5, "retain_tokens auto: this fraction of the free memory (GPU: device; "
                                                "CPU: system / ranks)")
    retain_memory_gb: float | None = option(None, "retain_tokens auto: this many GiB per rank instead")

    def __post_init__(self) -> None:
        """Both scripts' one check of these options, before any model loads (the step checks its own arguments)."""
        self.retain_tokens = parse_retain(self.retain_tokens)  # both parsers hand over text
        try:
            check_planning(self.planner, self.chunk_costs or None, self.retain_tokens, self.retain_memory_fraction,
                           self.retain_memory_gb)
        except ValueError as e:
            raise ConfigError(str(e)) from None
