"""Reading training files and splitting global batches across ranks (CPU only, fast)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ds_contrastive.data.files import GlobalBatches, load_pairs
from ds_contrastive.errors import DataError

ROWS = {
    "anchor": ["what is a cat", "Ünïcode, with \"quotes\"", "multi\nline text", "NA"],
    "positive": ["a small feline", "text with, commas", "null", "  padded  "],
    "negative": ["a dog", "a car", "a tree", "a rock"],
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def records(rows: dict[str, list]) -> list[dict]:
    return [dict(zip(rows, values)) for values in zip(*rows.values())]


def write(tmp_path: Path, fmt: str, rows: dict[str, list]) -> Path:
    """Write ``rows`` in one of the supported formats with a standard writer."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", records(rows))
    if fmt == "json":
        return write_jsonl(tmp_path / "data.json", records(rows))
    if fmt == "csv":
        path = tmp_path / "data.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        return path
    if fmt == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.table(rows), path)
        return path
    if fmt == "dataset":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_dict(rows).save_to_disk(str(path))
        return path
    raise AssertionError(fmt)


FORMATS = ["jsonl", "json", "csv", "parquet", "dataset"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
    path = write(tmp_path, fmt, ROWS)
    assert load_pairs(path, ["anchor", "positive", "negative"]) == ROWS
    # Only the requested columns, in the requested order; str paths work too.
    loaded = load_pairs(str(path), ["positive", "anchor"])
    assert list(loaded) == ["positive", "anchor"]
    assert loaded == {"positive": ROWS["positive"], "anchor": ROWS["anchor"]}


def test_dataset_dict_with_one_split(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(path))
    assert load_pairs(path, ["anchor", "positive"]) == {"anchor": ROWS["anchor"], "positive": ROWS["positive"]}


def test_dataset_dict_with_several_splits(tmp_path):
    import datasets

    path = tmp_path / "dd"
    ds = datasets.Dataset.from_dict(ROWS)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"DatasetDict.*train.*test"):
        load_pairs(path, ["anchor", "positive"])


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl.*does not exist"):
        load_pairs(tmp_path / "nope.jsonl", ["anchor"])


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("a\tb\n")
    with pytest.raises(DataError, match=r"data\.txt.*unknown extension '\.txt'"):
        load_pairs(path, ["anchor"])


def test_directory_not_saved_by_datasets(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        load_pairs(tmp_path, ["anchor"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_absent_column_lists_columns(tmp_path, fmt):
    path = write(tmp_path, fmt, ROWS)
    with pytest.raises(DataError, match=r"no column\(s\) \['query'\].*'anchor', 'positive', 'negative'") as info:
        load_pairs(path, ["anchor", "query"])
    assert path.name in str(info.value)
    assert "--anchor_column q --positive_column d --negative_columns n1,n2" in str(info.value)  # how to map them


def test_jsonl_column_absent_on_a_later_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": "x", "b": "y"}, {"a": "x"}])
    with pytest.raises(DataError, match=r"line 2: no column\(s\) \['b'\] \(columns: \['a'\]\)"):
        load_pairs(path, ["a", "b"])


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": "x"}\n\n{"a": "y"\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 3: malformed JSON"):
        load_pairs(path, ["a"])


def test_json_array_is_not_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": "x"}]))
    with pytest.raises(DataError, match=r"line 1: expected a JSON object per line"):
        load_pairs(path, ["a"])


@pytest.mark.parametrize(
    ("value", "problem"), [(None, "is null"), ("", "is empty"), ("   ", "is empty"), (3, "is int, expected a string")]
)
def test_bad_value_in_jsonl_names_column_and_line(tmp_path, value, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": "x", "b": "y"}, {"a": "x", "b": value}])
    with pytest.raises(DataError, match=rf"d\.jsonl line 2: column 'b' {problem}"):
        load_pairs(path, ["a", "b"])


def test_bad_value_outside_requested_columns_is_ignored(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": "x", "b": None}])
    assert load_pairs(path, ["a"]) == {"a": ["x"]}


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":  # lines 1-4 fine, line 5 in Latin-1
        path.write_bytes(b'{"a": "x"}\n' * 4 + b'{"a": "caf\xe9"}\n')
    else:  # a header, 3 rows, then Latin-1 on line 5
        path.write_bytes(b"a\nx\ny\nz\ncaf\xe9\n")
    with pytest.raises(DataError, match=rf"d\.{suffix} line 5: not valid UTF-8"):
        load_pairs(path, ["a"])


def test_fewer_rows_than_one_global_batch_names_the_file(tmp_path):
    from ds_contrastive.run.setup import global_batches

    with pytest.raises(DataError, match=r"small\.jsonl: global_batch_size=8 must be between 1 and the 3 rows"):
        global_batches({"a": ["x", "y", "z"]}, 8, 0, "data/small.jsonl")


def test_empty_csv_cell_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\nx,y\nx,\n")
    with pytest.raises(DataError, match=r"d\.csv line 3: column 'b' is empty"):
        load_pairs(path, ["a", "b"])


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\nx,y\nx\n")
    with pytest.raises(DataError, match=r"d\.csv line 3: 1 fields, the header has 2"):
        load_pairs(path, ["a", "b"])


@pytest.mark.parametrize("fmt", ["parquet", "dataset"])
def test_null_in_columnar_formats_names_row(tmp_path, fmt):
    path = write(tmp_path, fmt, {"a": ["x", "y", "z"], "b": ["p", None, "r"]})
    with pytest.raises(DataError, match=r"row 1: column 'b' is null"):
        load_pairs(path, ["a", "b"])


def test_non_string_parquet_column(tmp_path):
    path = write(tmp_path, "parquet", {"a": ["x", "y"], "b": [1, 2]})
    with pytest.raises(DataError, match=r"row 0: column 'b' is int, expected a string"):
        load_pairs(path, ["a", "b"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_rows(tmp_path, fmt):
    if fmt in ("jsonl", "json"):
        path = tmp_path / f"d.{fmt}"
        path.write_text("\n")
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        path.write_text("a,b\n")
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())}), path)
    else:
        import datasets

        path = tmp_path / "saved"
        # Filtered to nothing keeps one (empty) shard, which datasets can load back.
        datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]}).filter(lambda row: False).save_to_disk(str(path))
    with pytest.raises(DataError, match="no rows"):
        load_pairs(path, ["a", "b"])


def test_dataset_saved_with_zero_shards(tmp_path):
    import datasets

    path = tmp_path / "saved"
    features = datasets.Features({"a": datasets.Value("string")})
    datasets.Dataset.from_dict({"a": []}, features=features).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"saved.*0 rows"):
        load_pairs(path, ["a"])


def corpus(n: int) -> dict[str, list[str]]:
    return {"anchor": [f"q{i}" for i in range(n)], "positive": [f"d{i}" for i in range(n)]}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [6, 7, 8])
def test_shards_partition_the_global_batch(world_size, batch_size):
    data = corpus(50)
    batches = GlobalBatches(data, batch_size, seed=3)
    for step in (0, 1, batches.steps_per_epoch + 2):
        batch = batches.global_batch(step)
        shards = [batches.shard(step, rank, world_size) for rank in range(world_size)]
        anchors = [a for shard in shards for a in shard["anchor"]]
        # Contiguous slices in rank order: concatenated they are the global batch itself.
        assert anchors == [data["anchor"][i] for i in batch]
        assert len(set(anchors)) == batch_size
        sizes = [len(shard["anchor"]) for shard in shards]
        base, extra = divmod(batch_size, world_size)
        assert sizes == [base + 1] * extra + [base] * (world_size - extra)
        for shard in shards:  # anchor and positive stay paired
            assert [a[1:] for a in shard["anchor"]] == [p[1:] for p in shard["positive"]]


def test_epoch_covers_every_row_once_when_divisible():
    batches = GlobalBatches(corpus(24), 6, seed=0)
    assert batches.steps_per_epoch == 4
    for epoch in (0, 1):
        seen = [i for s in range(4) for i in batches.global_batch(epoch * 4 + s)]
        assert sorted(seen) == list(range(24))
        assert seen == batches.epoch_order(epoch)


def test_drop_last_skips_the_remainder():
    batches = GlobalBatches(corpus(26), 6, seed=0)
    assert batches.steps_per_epoch == 4
    seen = [i for s in range(4) for i in batches.global_batch(s)]
    assert Counter(seen).most_common(1)[0][1] == 1
    assert seen == batches.epoch_order(0)[:24]
    # The next step starts the next epoch instead of serving the 2 leftover rows.
    assert batches.global_batch(4) == batches.epoch_order(1)[:6]


def test_keep_last_serves_a_partial_batch():
    batches = GlobalBatches(corpus(26), 6, seed=0, drop_last=False)
    assert batches.steps_per_epoch == 5
    assert [len(batches.global_batch(s)) for s in range(5)] == [6, 6, 6, 6, 2]
    seen = [i for s in range(5) for i in batches.global_batch(s)]
    assert sorted(seen) == list(range(26))


def test_orders_differ_across_epochs_and_repeat_for_a_seed():
    a = GlobalBatches(corpus(100), 10, seed=7)
    b = GlobalBatches(corpus(100), 10, seed=7)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert sorted(a.epoch_order(1)) == list(range(100))
    assert a.epoch_order(1) == b.epoch_order(1)
    assert a.epoch_order(0) == b.epoch_order(0)  # after the cache moved on, too
    assert [a.global_batch(s) for s in range(25)] == [b.global_batch(s) for s in range(25)]
    assert GlobalBatches(corpus(100), 10, seed=8).epoch_order(0) != a.epoch_order(0)


def test_epoch_order_copy_does_not_corrupt_later_batches():
    batches = GlobalBatches(corpus(20), 5, seed=1)
    expected = batches.global_batch(0)
    batches.epoch_order(0).reverse()
    assert batches.global_batch(0) == expected


@pytest.mark.parametrize("size", [0, -1, 11])
def test_batch_size_out_of_range(size):
    with pytest.raises(DataError, match=rf"global_batch_size={size} .*10 rows"):
        GlobalBatches(corpus(10), size, seed=0)


def test_world_larger_than_batch():
    batches = GlobalBatches(corpus(10), 2, seed=0)
    with pytest.raises(DataError, match=r"world_size=3 > global_batch_size=2.*empty shard"):
        batches.shard(0, 0, 3)


def test_world_larger_than_kept_partial_batch_fails_on_first_step():
    batches = GlobalBatches(corpus(10), 4, seed=0, drop_last=False)  # last batch has 2 rows
    with pytest.raises(DataError, match=r"world_size=3 > 2 rows.*partial batch"):
        batches.shard(0, 0, 3)


def test_rank_outside_world():
    batches = GlobalBatches(corpus(10), 4, seed=0)
    with pytest.raises(DataError, match="rank 2 is not in a world of 2"):
        batches.shard(0, 2, 2)


def test_columns_of_different_lengths():
    with pytest.raises(DataError, match="different lengths"):
        GlobalBatches({"a": ["x", "y"], "b": ["x"]}, 1, seed=0)
