"""Training data for ``launch/train.py``: reading text pairs and splitting global batches.

Every rank reads the same file and draws the same permutation, so the ranks
agree on each global batch without communicating. Each optimizer step
consumes one global batch; each rank trains on its own contiguous slice of it,
so every example of the batch is in exactly one rank's shard and the engine
sees the whole global batch as one contrastive batch.

Locations in error messages: JSONL and CSV problems name the 1-based line of
the file; Parquet and ``save_to_disk`` problems name the 0-based row (as
``dataset[i]`` would index it).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import torch

from ..errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet",)

# The loaders return the requested columns' raw values and a function that
# names where row i came from, for error messages.
Located = tuple[dict[str, list[object]], Callable[[int], str]]


def load_pairs(path: str | Path, columns: list[str]) -> dict[str, list[str]]:
    """Read ``columns`` of a JSONL, CSV, Parquet or ``save_to_disk`` dataset as lists of str.

    Returns the columns in the order asked for. Every value must be a
    non-empty string: a null or blank text would otherwise only fail inside a
    training step, possibly hours in, on whichever rank drew it.
    """
    path = Path(path)
    if not columns:
        raise DataError(f"{path}: no columns requested")
    if len(set(columns)) != len(columns):
        raise DataError(f"{path}: columns {columns} name a column more than once")
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    values, locate = _read(path, columns)
    for name in columns:
        _check_texts(path, name, values[name], locate)
    rows = len(values[columns[0]])
    if rows == 0:
        raise DataError(f"{path}: no rows")
    return {name: cast(list[str], values[name]) for name in columns}


def _read(path: Path, columns: list[str]) -> Located:
    """Dispatch on the path: a directory is a ``save_to_disk`` dataset, a file goes by its suffix."""
    if path.is_dir():
        return _read_saved_dataset(path, columns)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, columns)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path, columns)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, columns)
    known = ", ".join(JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES)
    raise DataError(
        f"{path}: unknown extension {path.suffix!r} (expected {known}, or a directory saved by Dataset.save_to_disk)"
    )


# How a user points the run at their file's own column names: said wherever a requested column is absent.
COLUMN_OPTIONS = ("; name yours with anchor_column, positive_column and negative_columns (on the command line: "
                  "--anchor_column q --positive_column d --negative_columns n1,n2)")


def _missing_columns(path: Path, columns: list[str], available: list[str], where: str = "") -> DataError | None:
    """The error for requested columns that are absent, listing the ones that exist; None if all exist."""
    missing = [name for name in columns if name not in available]
    if not missing:
        return None
    return DataError(f"{path}{where}: no column(s) {missing} (columns: {available}){COLUMN_OPTIONS}")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) of a UTF-8 file; a leading byte-order mark is dropped."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e


def _not_utf8(path: Path, error: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8, naming its first line that does not decode.

    A text-mode read fails somewhere in a buffer, not on a line; each line is
    decoded alone here (a UTF-8 sequence never contains a newline byte).
    """
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path} line {number}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)")
    return DataError(f"{path}: not valid UTF-8 ({error})")


def _read_jsonl(path: Path, columns: list[str]) -> Located:
    """One JSON object per line; blank lines are skipped. Columns are checked on every line."""
    values: dict[str, list[object]] = {name: [] for name in columns}
    line_numbers: list[int] = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: malformed JSON ({e.msg}); expected one JSON object per line") from e
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {number}: expected a JSON object per line (JSON Lines), got {type(record).__name__}"
            )
        error = _missing_columns(path, columns, list(record), f" line {number}")
        if error:
            raise error
        for name in columns:
            values[name].append(record[name])
        line_numbers.append(number)
    return values, lambda i: f"line {line_numbers[i]}"


def _read_csv(path: Path, columns: list[str]) -> Located:
    """A header row then one row per example; rows must have as many fields as the header."""
    values: dict[str, list[object]] = {name: [] for name in columns}
    line_numbers: list[int] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file, expected a header row")
            positions = _csv_positions(path, header, columns)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
                    )
                for name, position in positions.items():
                    values[name].append(row[position])
                line_numbers.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e})") from e
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    return values, lambda i: f"line {line_numbers[i]}"


def _csv_positions(path: Path, header: list[str], columns: list[str]) -> dict[str, int]:
    """Field index of each requested column; a column named twice in the header is ambiguous."""
    error = _missing_columns(path, columns, header)
    if error:
        raise error
    repeated = [name for name in columns if header.count(name) > 1]
    if repeated:
        raise DataError(f"{path}: column(s) {repeated} appear more than once in the header")
    return {name: header.index(name) for name in columns}


def _read_parquet(path: Path, columns: list[str]) -> Located:
    """Read only the requested columns; the schema is checked first so the error lists what exists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        error = _missing_columns(path, columns, pq.read_schema(path).names)
        if error:
            raise error
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet ({e})") from e
    return {name: table.column(name).to_pylist() for name in columns}, lambda i: f"row {i}"


def _read_saved_dataset(path: Path, columns: list[str]) -> Located:
    """A ``Dataset.save_to_disk`` directory; a DatasetDict is accepted only with exactly one split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a directory saved by Dataset.save_to_disk ({e})") from e
    except IndexError as e:
        # datasets (seen in 5.2) saves a 0-row dataset as 0 shards, then fails to concatenate them on load.
        raise DataError(
            f"{path}: cannot load the saved dataset, which is what datasets does with 0 rows ({e!r})"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {splits}; save the one split to train on")
        loaded = loaded[splits[0]]
    error = _missing_columns(path, columns, loaded.column_names)
    if error:
        raise error
    # ``[:]`` turns a lazy ``Column`` (datasets >= 4) into a list; on older versions it copies a list.
    return {name: loaded[name][:] for name in columns}, lambda i: f"row {i}"


def _check_texts(path: Path, column: str, values: list[object], locate: Callable[[int], str]) -> None:
    """Every value must be a string with some non-whitespace text, as ``train_step`` requires."""
    for i, value in enumerate(values):
        problem = text_problem(column, value)
        if problem:
            raise DataError(f"{path} {locate(i)}: {problem}")


def text_problem(column: str, value: object) -> str | None:
    """What makes ``value`` unusable as a training text of ``column`` (None: nothing)."""
    if value is None:
        return f"column {column!r} is null"
    if not isinstance(value, str):
        return f"column {column!r} is {type(value).__name__}, expected a string"
    if not value.strip():
        return f"column {column!r} is empty"
    return None


def columns_digest(data: dict[str, list[str]]) -> str:
    """A digest of columns of texts, names and order included: equal data, equal digests.

    Compares data across ranks or runs without sending the texts.
    """
    digest = hashlib.blake2b(digest_size=16)
    for column, texts in data.items():
        digest.update(column.encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global batch; the first ``len % world_size`` ranks get one more."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (1 if rank < extra else 0)]


class GlobalBatches:
    """Deterministic global batches over ``data`` and each rank's shard of them.

    ``step`` counts optimizer steps across epochs, so a run resumed at step
    ``s`` sees exactly the batches it would have seen without stopping.
    """

    def __init__(self, data: dict[str, list[str]], global_batch_size: int, seed: int, drop_last: bool = True):
        self.data = data
        self.rows = _row_count(data)
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
            raise DataError(f"global_batch_size must be an int, got {type(global_batch_size).__name__}")
        if not 1 <= global_batch_size <= self.rows:
            raise DataError(
                f"global_batch_size={global_batch_size} must be between 1 and the {self.rows} rows of the data"
            )
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.drop_last = drop_last
        self._order: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch, plus the partial last one unless ``drop_last``."""
        full, rest = divmod(self.rows, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def smallest_batch(self) -> int:
        """Rows in the smallest global batch any step will have (the partial one, when kept)."""
        rest = self.rows % self.global_batch_size
        return rest if rest and not self.drop_last else self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        """A permutation of all row indices, drawn from ``torch.Generator().manual_seed(seed + epoch)``.

        A CPU generator seeded only by ``seed + epoch`` makes the order the
        same on every rank and every run (with the same torch version), so
        the ranks agree on each batch without communicating. The last
        epoch's order is cached because every step of an epoch asks for it.
        """
        return list(self._permutation(epoch))

    def _permutation(self, epoch: int) -> list[int]:
        """The cached order of ``epoch`` itself, not a copy: callers must not modify it."""
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.rows, generator=generator).tolist())
        return self._order[1]

    def global_batch(self, step: int) -> list[int]:
        """Row indices of global step ``step``; epoch ``step // steps_per_epoch``."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size]

    def shard(self, step: int, rank: int, world_size: int) -> dict[str, list[str]]:
        """This rank's contiguous slice of step ``step``'s global batch, as column -> texts.

        With B rows over W ranks the first ``B % W`` ranks get one row more,
        so shard sizes differ by at most one.
        """
        self._check_world(rank, world_size)
        indices = rank_slice(self.global_batch(step), rank, world_size)
        return {name: [texts[i] for i in indices] for name, texts in self.data.items()}

    def _check_world(self, rank: int, world_size: int) -> None:
        """Refuse a world in which some step would leave a rank an empty shard.

        Checked against the smallest batch of any step, so a kept partial
        last batch fails on the first step rather than at the end of an epoch.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size} ranks")
        if world_size > self.global_batch_size:
            raise DataError(
                f"world_size={world_size} > global_batch_size={self.global_batch_size}: a rank would get an empty shard"
            )
        if world_size > self.smallest_batch:
            raise DataError(
                f"world_size={world_size} > {self.smallest_batch} rows of each epoch's last partial batch "
                f"({self.rows} rows, global_batch_size={self.global_batch_size}, drop_last=False): a rank would "
                "get an empty shard; use drop_last=True or a batch size that divides the rows"
            )


def _row_count(data: dict[str, list[str]]) -> int:
    """The common length of the columns; they must exist, agree and be non-empty."""
    if not data:
        raise DataError("data has no columns")
    lengths = {name: len(texts) for name, texts in data.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"data columns have different lengths: {lengths}")
    rows = next(iter(lengths.values()))
    if rows == 0:
        raise DataError("data has no rows")
    return rows
