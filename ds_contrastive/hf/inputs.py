"""What ContrastiveTrainer is given, checked: training arguments, datasets by name, their losses and prompts.

sentence-transformers takes one dataset or a ``DatasetDict`` of them, one loss
or a dict of losses by dataset name, and prompts as a string, per column or
per dataset. These functions turn those into one entry per dataset (``None``:
a single Dataset) and refuse, naming the argument, what the exact step cannot
honour.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

from ..losses.infonce import InfoNCE
from ..losses.matryoshka import Matryoshka

Objective = InfoNCE | Matryoshka
RESERVED_COLUMNS = ("label", "score", "dataset_name", "return_loss")
Prompts = str | dict[str, str] | dict[str, str | dict[str, str]] | None


class RawTextCollator:
    """Collate rows into ``{column: [raw strings]}`` in the dataset's column order.

    ds_contrastive tokenizes inside the step (length-sorted chunks, per-rank),
    so the collator only groups strings. ``prompts`` follows
    sentence-transformers: one string prefixed to every column, a
    ``{column: prompt}`` mapping, or either of those per dataset
    (``{dataset_name: ...}``). A row's ``dataset_name`` (added to every
    dataset of a ``DatasetDict``) becomes the batch's ``"dataset_name"``.
    Values are not checked here (one rank's collator failing would leave the
    others waiting); the step checks them on every rank and raises the same
    error everywhere.
    """

    def __init__(self, prompts: Prompts = None) -> None:
        self.prompts = prompts
        self.valid_label_columns = ["label", "score"]  # read by sentence-transformers' batch samplers

    def prompt(self, column: str, dataset: str | None = None) -> str:
        prompts = self.prompts
        if isinstance(prompts, dict) and dataset in prompts:
            prompts = prompts[dataset]
        if isinstance(prompts, str):
            return prompts
        prompt = (prompts or {}).get(column, "")
        return prompt if isinstance(prompt, str) else ""  # another dataset's prompts

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        dataset = rows[0].get("dataset_name")
        batch: dict[str, Any] = {}
        for column in rows[0]:
            if column == "dataset_name":
                continue
            prefix = self.prompt(column, dataset)
            batch[column] = [prefix + r[column] if prefix and isinstance(r[column], str) else r[column] for r in rows]
        if dataset is not None:
            batch["dataset_name"] = dataset
        return batch


def check_arguments(args: SentenceTransformerTrainingArguments) -> None:
    """Refuse training arguments the exact step cannot honour, naming the argument."""
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}: ContrastiveTrainer's global batch "
            "is one step's negatives; accumulating steps would change the loss. Raise "
            "per_device_train_batch_size instead (memory is set by chunk_tokens, not by the batch)")
    if args.fp16 or getattr(args, "mixed_precision", None) == "fp16":  # accelerate can set it without fp16=True
        raise ValueError("fp16 is not supported (loss scaling of the cached gradient); use bf16")
    checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
    options = (getattr(args, "activation_checkpointing_kwargs", None)
               or getattr(args, "gradient_checkpointing_kwargs", None) or {})
    if checkpointing and isinstance(options, dict) and options.get("use_reentrant"):
        raise ValueError("gradient checkpointing with use_reentrant=True is not supported by the cached step (a "
                         "chunk's inputs need no gradient, so reentrant checkpoints give their layers none); leave "
                         "use_reentrant unset or False: non-reentrant checkpointing is exact")


def as_dataset_dict(dataset: Any) -> Any:
    """A plain ``dict`` of datasets as the ``DatasetDict`` sentence-transformers makes of it; others unchanged."""
    return DatasetDict(dataset) if isinstance(dataset, dict) and not isinstance(dataset, DatasetDict) else dataset


def named_columns(train_dataset: Any, eval_dataset: Any) -> dict[str | None, list[str]]:
    """Each dataset's columns by its name (``None``: a single Dataset); a name in both splits has one anchor/positive.

    Without any dataset (a Trainer made to evaluate with an evaluator only):
    the default ``anchor``/``positive`` columns.
    """
    columns: dict[str | None, list[str]] = {}
    for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is None:
            continue
        named = dataset.items() if isinstance(dataset, DatasetDict) else [(None, dataset)]
        for name, part in named:
            where = f"{split}_dataset" + (f"[{name!r}]" if name is not None else "")
            got = dataset_columns(part, where)
            if name in columns and columns[name][:2] != got[:2]:
                raise ValueError(f"{where}'s anchor and positive columns {got[:2]} differ from train_dataset"
                                 f"{'' if name is None else f'[{name!r}]'}'s {columns[name][:2]}")
            columns.setdefault(name, got)
    return columns or {None: ["anchor", "positive"]}


def objective_of(loss: Objective | dict[str, Objective], name: str | None, *datasets: Any) -> Objective:
    """The loss of dataset ``name``: the one loss, or its entry of a dict keyed by dataset name (sentence-transformers')."""
    if not isinstance(loss, dict):
        return loss
    if name is None or any(d is not None and not isinstance(d, DatasetDict) for d in datasets):
        raise ValueError("a dict of losses is keyed by dataset name: train_dataset and eval_dataset must then be "
                         "DatasetDicts (or dicts of datasets)")
    names = {name for d in datasets if isinstance(d, DatasetDict) for name in d}
    if set(loss) - names:
        raise ValueError(f"the dict of losses names dataset(s) {sorted(set(loss) - names)} that neither train_dataset "
                         f"nor eval_dataset holds (theirs: {sorted(names)})")
    if name not in loss:
        raise ValueError(f"dataset {name!r} has no loss in the dict of losses (its keys: {sorted(loss)})")
    return loss[name]


def learned_temperature(objectives: list[Objective]) -> Objective | None:
    """The objective whose learnable temperature every dataset shares (one parameter); None when it is fixed."""
    learnable = [o for o in objectives if o.learnable_temperature]
    if not learnable:
        return None
    if len(learnable) < len(objectives) or len({(o.initial_log_scale(), o.max_scale) for o in learnable}) > 1:
        raise ValueError("a learnable temperature is one parameter of the model, shared by every dataset: give every "
                         "loss learnable_temperature=True with the same temperature and min_temperature, or none")
    return learnable[0]


def check_prompts(prompts: Prompts, model: SentenceTransformer, datasets: list[str]) -> None:
    """Refuse prompts the step cannot honour: per-dataset prompts missing a dataset, or pooling without prompts."""
    if any(getattr(m, "include_prompt", True) is False for m in model):
        raise ValueError("prompts with a Pooling module that excludes prompt tokens (include_prompt=False) are "
                         "not supported: the step pools every token it embeds")
    if isinstance(prompts, dict) and any(isinstance(p, dict) for p in prompts.values()):
        if not datasets:
            raise ValueError(f"prompts are given per dataset ({sorted(prompts)}), but the datasets are single "
                             "Datasets, not DatasetDicts naming their datasets")
        missing = [name for name in datasets if name not in prompts]
        if missing:
            raise ValueError(f"prompts are given per dataset ({sorted(prompts)}), but dataset(s) {missing} have none: "
                             "give every dataset of the DatasetDict its entry")


def dataset_columns(dataset: Any, where: str) -> list[str]:
    """The columns of one train/eval dataset: anchor, positive, then hard negatives; refuse what cannot train."""
    columns = list(getattr(dataset, "column_names", None) or [])
    if len(columns) < 2:
        raise ValueError(f"{where} needs an anchor and a positive column, got columns {columns}")
    reserved = [c for c in columns if c in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(
            f"{where} has column(s) {reserved}: contrastive losses take (anchor, positive, negatives...) "
            "text columns only; remove labels/scores with dataset.remove_columns")
    return columns
