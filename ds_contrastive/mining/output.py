"""The mined file, written so that it exists only once complete.

Rows stream into a hidden ``.NAME.PID.partial`` file in the output's own
folder (so the final rename stays on one filesystem and is atomic:
``os.replace``). An exception or SIGTERM removes the partial file; a
SIGKILL cannot be caught, so it may leave one behind, never the output:
the next run writing the same output removes such leftovers first.

Columns are the pairs file's anchor and positive columns, ``negative_1`` ..
``negative_k``, and ``scores`` ([positive, negative_1, ..., negative_k]):
sentence-transformers' n-tuple format with ``output_scores=True``. The
training config reads the file as it is (``--negative_columns
negative_1,negative_2,...``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ..errors import ConfigError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def output_format(path: str | Path) -> str:
    """``jsonl`` or ``parquet``, from the output's suffix; ConfigError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--output {path}: unknown extension {suffix!r} (expected {', '.join(FORMATS)})")
    return FORMATS[suffix]


def check_output(path: str | Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``) or whose folder does not, before any work is done."""
    path = Path(path)
    output_format(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"--output {path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {path}: folder {path.parent} does not exist")


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def remove_leftovers(path: Path) -> None:
    """Remove partial files that killed runs writing ``path`` left behind."""
    for leftover in path.parent.glob(f".{path.name}.*.partial"):
        leftover.unlink(missing_ok=True)


def negative_columns(count: int) -> list[str]:
    return [f"negative_{i}" for i in range(1, count + 1)]


class MinedWriter:
    """Streams blocks of rows into the partial file; :meth:`commit` renames it to the output.

    Leaving the ``with`` block without committing (an error, SIGTERM turned
    into SystemExit) removes the partial file.
    """

    def __init__(self, path: str | Path, anchor_column: str, positive_column: str, num_negatives: int) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.columns = [anchor_column, positive_column, *negative_columns(num_negatives)]
        self.partial = partial_path(self.path)
        self.rows = 0
        self._file: IO[str] | None = None
        self._parquet: Any = None

    def __enter__(self) -> MinedWriter:
        remove_leftovers(self.path)
        if self.format == "jsonl":
            self._file = self.partial.open("w", encoding="utf-8")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([(c, pa.string()) for c in self.columns] + [("scores", pa.list_(pa.float32()))])
            self._parquet = pq.ParquetWriter(self.partial, schema)
        return self

    def write(self, texts: list[list[str]], scores: list[list[float]]) -> None:
        """Rows given as their texts (the columns, in order) and their scores."""
        if self._file is not None:
            for row, row_scores in zip(texts, scores):
                record = dict(zip(self.columns, row), scores=row_scores)
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif texts:
            import pyarrow as pa

            columns = {c: [row[i] for row in texts] for i, c in enumerate(self.columns)}
            self._parquet.write_table(pa.table({**columns, "scores": scores}, schema=self._parquet.schema))
        self.rows += len(texts)

    def commit(self) -> None:
        """Close the partial file, flushed to disk, and rename it to the output."""
        self._close()
        with open(self.partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.partial, self.path)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._close()
        self.partial.unlink(missing_ok=True)  # after commit() it is gone already


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(partial)`` then rename the partial file to ``path``; on failure nothing is left."""
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
