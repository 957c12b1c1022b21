"""What mining reads: (anchor, positive) pairs and a corpus, grouped by query as sentence-transformers groups them.

Every rank reads the same files and builds the same :class:`MiningData`, so
the ranks agree on every index without communicating (as training's data
does). A problem is a :class:`~ds_contrastive.errors.DataError` naming the
file, row and column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.files import load_pairs
from ..errors import DataError
from ..run.options import BUILTIN_DATA


@dataclass
class MiningData:
    """Unique queries, the deduplicated corpus, and each query's positives as corpus indices.

    ``queries`` are the distinct anchor texts in order of first appearance;
    ``corpus`` is the corpus then the positives, each distinct text once, in
    order of first appearance (sentence-transformers' ``dict.fromkeys(corpus
    + positives)``), so every positive is in it and a text identical to a
    positive is that positive. ``positives[q]`` lists query q's positives in
    order of first appearance: its output rows, one per positive.
    """

    queries: list[str]
    corpus: list[str]
    positives: list[list[int]]

    @property
    def max_positives(self) -> int:
        return max(map(len, self.positives))

    @property
    def rows(self) -> int:
        return sum(map(len, self.positives))


def read_pairs(path: str, anchor_column: str, positive_column: str) -> tuple[list[str], list[str]]:
    """The anchor and positive texts of a pairs file, or of the built-in stdlib training pairs."""
    if path == BUILTIN_DATA:
        from ..data.stdlib_pairs import stdlib_pairs, train_heldout_split

        train, _ = train_heldout_split(stdlib_pairs())
        return [a for a, _ in train], [p for _, p in train]
    data = load_pairs(path, [anchor_column, positive_column])
    return data[anchor_column], data[positive_column]


def read_corpus(path: str, column: str) -> list[str]:
    """One column of a JSONL, CSV, Parquet or ``save_to_disk`` file: every value a non-empty string."""
    return load_pairs(path, [column])[column]


def group_by_query(anchors: list[str], positives: list[str], corpus: list[str], where: str) -> MiningData:
    """Group rows by anchor text; an (anchor, positive) pair repeated is refused, naming both rows.

    sentence-transformers drops a repeated pair silently, so its output has
    fewer rows than its input; in a training batch the repeat would also be
    its own false negative. Rows are 0-based, in the file's order.
    """
    seen: dict[tuple[str, str], int] = {}
    for row, pair in enumerate(zip(anchors, positives)):
        first = seen.setdefault(pair, row)
        if first != row:
            raise DataError(f"{where}: rows {first} and {row} (0-based) hold the same (anchor, positive) pair; "
                            f"remove the repeated rows (anchor {pair[0][:80]!r})")
    documents = list(dict.fromkeys(corpus + positives))
    position = {text: i for i, text in enumerate(documents)}
    query_position: dict[str, int] = {}
    grouped: list[list[int]] = []
    for anchor, positive in zip(anchors, positives):
        q = query_position.setdefault(anchor, len(grouped))
        if q == len(grouped):
            grouped.append([])
        grouped[q].append(position[positive])  # distinct: a repeated pair was refused above
    return MiningData(list(query_position), documents, grouped)


def read_inputs(pairs: str, anchor_column: str, positive_column: str, corpus: str | None,
                corpus_column: str | None) -> MiningData:
    """The pairs and the corpus (the positives alone when ``corpus`` is None) as :class:`MiningData`."""
    anchors, positives = read_pairs(pairs, anchor_column, positive_column)
    documents: list[str] = []
    if corpus is not None:
        if not corpus_column:
            raise DataError(f"{corpus}: name the corpus's text column with --corpus_column")
        if not Path(corpus).exists():
            raise DataError(f"{corpus}: file does not exist")
        documents = read_corpus(corpus, corpus_column)
    return group_by_query(anchors, positives, documents, pairs)
