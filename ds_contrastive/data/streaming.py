"""Global batches of a JSONL or Parquet file larger than memory, each rank parsing only its own rows.

The file is read front to back in windows of ``window_batches`` global
batches. Rows are shuffled within a window by a generator seeded with
``(seed, epoch, window)`` only, so every rank draws the same permutation
without communicating; each rank then parses and keeps only its contiguous
slice of each global batch (as :class:`~ds_contrastive.data.files.GlobalBatches`
splits them). Memory holds one window of raw rows (JSONL lines, or a Parquet
record batch of the named columns), whatever the size of the file.

Each epoch is one pass over the file; the rows after its last full global
batch are dropped. A bad row (malformed JSON, a missing, null, non-string or
empty column) is skipped on the rank that owns it and counted; more than
``max_bad_rows`` raise :class:`~ds_contrastive.errors.DataError` naming the
file and line (JSONL, 1-based) or row (Parquet, 0-based).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import DataError
from .files import COLUMN_OPTIONS, JSONL_SUFFIXES, PARQUET_SUFFIXES, rank_slice, text_problem


class StreamingBatches:
    """This rank's shard of each global batch of a file read as a stream.

    Args:
        path: a ``.jsonl``/``.json`` (JSON Lines) or ``.parquet`` file.
        columns: the columns to read (anchor, positive, negatives).
        global_batch_size: rows per global batch, over all ranks.
        seed: shuffling seed (windows are shuffled with ``(seed, epoch, window)``).
        window_batches: global batches per shuffling window; memory grows with it.
        max_bad_rows: bad rows this rank may skip (in all) before it raises.
    """

    def __init__(self, path: str | Path, columns: list[str], global_batch_size: int, seed: int,
                 window_batches: int = 16, max_bad_rows: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"training data {self.path} does not exist")
        if self.path.suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
            raise DataError(f"{self.path}: streaming reads JSON Lines (.jsonl) or Parquet (.parquet) files")
        if global_batch_size < 1 or window_batches < 1 or max_bad_rows < 0:
            raise DataError(f"global_batch_size and window_batches must be >= 1 and max_bad_rows >= 0, got "
                            f"{global_batch_size}, {window_batches}, {max_bad_rows}")
        self.columns = columns
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.window_rows = window_batches * global_batch_size
        self.max_bad_rows = max_bad_rows
        self.bad_rows = 0  # skipped by this rank so far
        self.parquet = self.path.suffix in PARQUET_SUFFIXES

    def shards(self, rank: int, world_size: int, start_step: int = 0) -> Iterator[dict[str, list[str]]]:
        """This rank's shard of global steps ``start_step``, ``start_step + 1``, ... (endless, epoch after epoch).

        A resumed run passes the step it stopped at: the windows before it are
        read but neither shuffled nor parsed.
        """
        if world_size > self.global_batch_size or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} of {world_size} cannot take a shard of global batches of "
                            f"{self.global_batch_size} rows")
        step, epoch = 0, 0
        while True:
            batches_this_epoch = 0
            for window, (first_row, rows) in enumerate(self._windows()):
                count = len(rows) // self.global_batch_size
                batches_this_epoch += count
                if step + count <= start_step:  # resuming: skip the whole window unparsed
                    step += count
                    continue
                generator = torch.Generator().manual_seed(hash_seed(self.seed, epoch, window))
                order = torch.randperm(len(rows), generator=generator).tolist()
                for b in range(count):
                    if step >= start_step:
                        batch = order[b * self.global_batch_size:(b + 1) * self.global_batch_size]
                        yield self._parse(rows, first_row, rank_slice(batch, rank, world_size))
                    step += 1
            if batches_this_epoch == 0:
                raise DataError(f"{self.path} has fewer usable rows than one global batch of "
                                f"{self.global_batch_size}")
            epoch += 1

    def _windows(self) -> Iterator[tuple[int, list]]:
        """(index of the window's first row, its raw rows) of one pass over the file."""
        rows: list = []
        first = 0
        for row in (self._parquet_rows() if self.parquet else self._jsonl_lines()):
            rows.append(row)
            if len(rows) == self.window_rows:
                yield first, rows
                first, rows = first + len(rows), []
        if rows:
            yield first, rows

    def _jsonl_lines(self) -> Iterator[tuple[int, bytes]]:
        with self.path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line

    def _parquet_rows(self) -> Iterator[tuple[int, dict]]:
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(self.path)
        missing = [c for c in self.columns if c not in reader.schema_arrow.names]
        if missing:
            raise DataError(f"{self.path}: no column(s) {missing} (columns: {reader.schema_arrow.names})"
                            f"{COLUMN_OPTIONS}")
        row = 0
        for record_batch in reader.iter_batches(batch_size=min(self.window_rows, 65536), columns=self.columns):
            for values in record_batch.to_pylist():
                yield row, values
                row += 1

    def _parse(self, rows: list, first_row: int, indices: list[int]) -> dict[str, list[str]]:
        shard: dict[str, list[str]] = {name: [] for name in self.columns}
        for i in indices:
            record, where = self._record(rows[i], first_row + i)
            problem = record if isinstance(record, str) else self._check(record)
            if problem:
                self.bad_rows += 1
                if self.bad_rows > self.max_bad_rows:
                    raise DataError(f"{self.path} {where}: {problem} ({self.bad_rows} bad rows on this rank, "
                                    f"more than max_bad_rows={self.max_bad_rows})")
                continue
            for name in self.columns:
                shard[name].append(record[name])
        return shard

    def _record(self, raw: tuple[int, object], row: int) -> tuple[dict | str, str]:
        """(the row as a mapping, or what is wrong with it; where it is)."""
        number, value = raw
        if self.parquet:
            return value, f"row {row}"
        where = f"line {number}"
        try:
            record = json.loads(value.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            return f"not valid UTF-8 ({e.reason})", where
        except json.JSONDecodeError as e:
            return f"malformed JSON ({e.msg})", where
        if not isinstance(record, dict):
            return f"expected a JSON object, got {type(record).__name__}", where
        return record, where

    def _check(self, record: dict) -> str | None:
        for name in self.columns:
            problem = f"no column {name!r}" if name not in record else text_problem(name, record[name])
            if problem:
                return problem
        return None


def hash_seed(seed: int, epoch: int, window: int) -> int:
    """A 63-bit generator seed from (seed, epoch, window), the same on every rank and run."""
    return random.Random(f"ds_contrastive-stream:{seed}:{epoch}:{window}").getrandbits(63)
