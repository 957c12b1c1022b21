"""Validation, hashing and tokenization of one rank's shard of raw text.

Each rank tokenizes its own strings with the model's own tokenizer: token ids
are never decoded and re-encoded (that is lossy for casing, accents and
unknown characters).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BatchError


@dataclass
class Shard:
    """One rank's validated shard: the column names and their texts.

    ``columns[0]`` is the anchor column, ``columns[1]`` the positive column,
    the rest are hard-negative columns, in the order the batch gave them.
    """

    columns: list[str]
    texts: list[list[str]]

    @property
    def rows(self) -> int:
        return len(self.texts[0])

    def flat(self) -> list[str]:
        """All texts column after column: sequence ``c * rows + i`` is row i of column c."""
        return [t for column in self.texts for t in column]


def validate_shard(batch: object, anchor: str, positive: str) -> Shard:
    """Check one rank's batch and order its columns; raise BatchError naming the problem."""
    if not isinstance(batch, Mapping):
        raise BatchError(f"a batch must be a mapping of column name to list of strings, got {type(batch).__name__}")
    for name in (anchor, positive):
        if name not in batch:
            raise BatchError(f"batch has no {name!r} column (columns: {sorted(map(str, batch))})")
    columns = [anchor, positive] + [c for c in batch if c not in (anchor, positive)]
    texts: list[list[str]] = []
    for name in columns:
        values = batch[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise BatchError(f"column {name!r} must be a list of strings, got {type(values).__name__}")
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise BatchError(f"column {name!r} row {i}: expected a string, got {type(value).__name__}")
            if not value.strip():
                raise BatchError(f"column {name!r} row {i}: empty string")
        texts.append(list(values))
    lengths = {name: len(t) for name, t in zip(columns, texts)}
    if len(set(lengths.values())) > 1:
        raise BatchError(f"columns have different lengths: {lengths}")
    if lengths[anchor] == 0:
        raise BatchError("empty batch: 0 rows")
    return Shard(columns, texts)


def text_hashes(texts: Sequence[str]) -> torch.Tensor:
    """64-bit content hashes, so ranks can find identical texts without sending strings."""
    values = [
        int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
        for t in texts
    ]
    return torch.tensor(values, dtype=torch.int64)


class Tokenized:
    """Unpadded token ids of a list of texts, stored flat, plus what padding needs.

    Ids live in one flat array with per-text offsets, so padding a chunk is a
    few vectorized copies rather than a Python loop over its rows (a global
    batch holds tens of thousands of texts, and every chunk is padded once).
    """

    def __init__(self, input_ids: list[list[int]], token_type_ids: list[list[int]] | None, pad_id: int,
                 truncated: int = 0) -> None:
        self.pad_id = pad_id
        self.truncated = truncated  # texts that were longer than the truncation length
        self._lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        self.lengths: list[int] = self._lengths.tolist()  # token count of each text
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)
        total = int(self._lengths.sum())
        self._ids = np.fromiter(itertools.chain.from_iterable(input_ids), dtype=np.int64, count=total)
        self._types = None if token_type_ids is None else np.fromiter(
            itertools.chain.from_iterable(token_type_ids), dtype=np.int64, count=total)

    def __len__(self) -> int:
        return len(self._lengths)

    def padded(self, indices: Sequence[int], pin: bool = False) -> dict[str, torch.Tensor]:
        """Right-padded model inputs for ``indices`` on the host, padded to the longest among them.

        ``pin``: in page-locked memory, so that a copy to a GPU does not block the host.
        """
        rows = np.asarray(indices, dtype=np.int64)
        lengths = self._lengths[rows]
        columns = np.arange(int(lengths.max()))
        real = columns[None, :] < lengths[:, None]
        where = np.where(real, self._starts[rows][:, None] + columns[None, :], 0)
        out = {"input_ids": torch.from_numpy(np.where(real, self._ids[where], self.pad_id)),
               "attention_mask": torch.from_numpy(real.astype(np.int64))}
        if self._types is not None:
            out["token_type_ids"] = torch.from_numpy(np.where(real, self._types[where], 0))
        return {k: v.pin_memory() for k, v in out.items()} if pin else out

    def features(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Right-padded model inputs for ``indices`` on ``device``, padded to the longest among them."""
        return to_device(self.padded(indices, pin=device.type == "cuda"), device)


def to_device(features: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy model inputs to ``device``; asynchronous from page-locked memory."""
    return {k: v.to(device, non_blocking=True) for k, v in features.items()}


def tokenizer_settings(model, max_length: int | None = None) -> tuple[int, bool]:
    """(truncation length, lowercase first) of a SentenceTransformer, as its own ``encode`` would use."""
    length = max_length or getattr(model, "max_seq_length", None) or 512
    first = model[0] if hasattr(model, "__getitem__") else None
    return length, bool(getattr(first, "do_lower_case", False))


def tokenize(tokenizer, texts: list[str], max_length: int, lowercase: bool = False) -> Tokenized:
    """Tokenize raw strings with truncation and no padding (padding is per chunk); count the truncated ones."""
    if lowercase:
        texts = [t.lower() for t in texts]
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Tokenized(enc["input_ids"], enc.get("token_type_ids"), pad_id, truncated_count(tokenizer, texts, enc,
                                                                                           max_length))


def truncated_count(tokenizer, texts: list[str], enc, max_length: int) -> int:
    """How many of ``texts`` lost tokens to truncation.

    A fast tokenizer keeps what it cut in each encoding's ``overflowing``;
    a slow one is asked for the untruncated length of the texts that reached
    ``max_length`` (only those can have been cut).
    """
    encodings = getattr(enc, "encodings", None)
    if encodings is not None:
        return sum(1 for e in encodings if e.overflowing)
    full = [t for t, ids in zip(texts, enc["input_ids"]) if len(ids) >= max_length]
    if not full:
        return 0
    return sum(1 for ids in tokenizer(full, truncation=False, padding=False)["input_ids"] if len(ids) > max_length)
