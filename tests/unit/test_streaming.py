"""Files larger than memory: deterministic per-rank shards of a streamed JSONL/Parquet file, bounded memory."""

import json
import subprocess
import sys

import pytest

from ds_contrastive.data.streaming import StreamingBatches
from ds_contrastive.errors import DataError
from jobs import ROOT


def write_jsonl(path, rows: int, bad: dict[int, bytes] | None = None):
    good = (json.dumps({"anchor": f"q{i}", "positive": f"d{i}"}).encode() for i in range(rows))
    path.write_bytes(b"".join((bad or {}).get(i, line) + b"\n" for i, line in enumerate(good)))
    return path


def take(stream, rank, world, steps, start=0):
    shards = stream.shards(rank, world, start_step=start)
    return [next(shards) for _ in range(steps)]


def test_ranks_split_each_global_batch_and_each_row_is_used_once_per_epoch(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", 103)
    stream = lambda: StreamingBatches(path, ["anchor", "positive"], 10, seed=1, window_batches=3)
    # windows of 30 rows: 3 + 3 + 3 + 1 batches per epoch (the last 3 rows are dropped)
    per_rank = [take(stream(), rank, 2, 20) for rank in range(2)]
    epochs = [[], []]
    for step in range(20):
        rows = per_rank[0][step]["anchor"] + per_rank[1][step]["anchor"]
        assert len(per_rank[0][step]["anchor"]) == 5 and len(set(rows)) == 10
        assert [f"d{a[1:]}" for a in per_rank[0][step]["anchor"]] == per_rank[0][step]["positive"]
        epochs[step // 10].extend(rows)
    for used in epochs:
        assert len(used) == len(set(used)) == 100
    assert epochs[0] != epochs[1]  # each epoch reshuffles


def test_resuming_at_a_step_gives_the_same_shards(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", 57)
    stream = lambda: StreamingBatches(path, ["anchor", "positive"], 6, seed=3, window_batches=2)
    full = take(stream(), 1, 3, 15)
    assert take(stream(), 1, 3, 8, start=7) == full[7:]


def test_parquet_streams_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 45
    pq.write_table(pa.table({"anchor": [f"q{i}" for i in range(rows)], "positive": [f"d{i}" for i in range(rows)],
                             "extra": list(range(rows))}), tmp_path / "pairs.parquet", row_group_size=7)
    jsonl = take(StreamingBatches(write_jsonl(tmp_path / "pairs.jsonl", rows), ["anchor", "positive"], 8, 0, 2), 0, 2, 5)
    parquet = take(StreamingBatches(tmp_path / "pairs.parquet", ["anchor", "positive"], 8, 0, 2), 0, 2, 5)
    assert parquet == jsonl


BAD_ROWS = [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe", "not valid UTF-8"),
    (json.dumps(["q", "d"]).encode(), "expected a JSON object, got list"),
    (json.dumps({"anchor": "q"}).encode(), "no column 'positive'"),
    (json.dumps({"anchor": None, "positive": "d"}).encode(), "column 'anchor' is null"),
    (json.dumps({"anchor": 3, "positive": "d"}).encode(), "column 'anchor' is int, expected a string"),
    (json.dumps({"anchor": "q", "positive": "  "}).encode(), "column 'positive' is empty"),
]


@pytest.mark.parametrize("line, problem", BAD_ROWS)
def test_a_bad_row_names_file_line_and_problem(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", 40, {5: line})
    with pytest.raises(DataError) as e:
        take(StreamingBatches(path, ["anchor", "positive"], 40, seed=0), 0, 1, 1)
    assert f"pairs.jsonl line 6: {problem}" in str(e.value) and "more than max_bad_rows=0" in str(e.value)


def test_bad_rows_are_skipped_and_counted_up_to_the_limit(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", 40, {3 * k: line for k, (line, _) in enumerate(BAD_ROWS)})
    stream = StreamingBatches(path, ["anchor", "positive"], 20, seed=0, window_batches=1, max_bad_rows=7)
    first = take(stream, 0, 1, 2)
    assert stream.bad_rows == 7 and sum(len(s["anchor"]) for s in first) == 33
    with pytest.raises(DataError, match="8 bad rows on this rank, more than max_bad_rows=7"):
        take(stream, 0, 1, 1)  # the next epoch meets them again


def test_a_file_smaller_than_one_global_batch_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", 7)
    with pytest.raises(DataError, match="fewer usable rows than one global batch of 8"):
        take(StreamingBatches(path, ["anchor", "positive"], 8, seed=0), 0, 1, 1)
    with pytest.raises(DataError, match="streaming reads JSON Lines"):
        StreamingBatches(write_jsonl(tmp_path / "pairs.csv", 3), ["anchor"], 1, 0)


MEMORY_PROBE = """
import json, resource, sys
from ds_contrastive.data.streaming import StreamingBatches
path, rows = sys.argv[1], int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stream = StreamingBatches(path, ["anchor", "positive"], 4096, seed=0, window_batches=8)
shards = stream.shards(0, 2)
seen = sum(len(next(shards)["anchor"]) for _ in range(rows // 4096))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows_seen": seen, "rss_before_mib": before / 1024, "rss_peak_mib": after / 1024}))
"""


def test_memory_stays_bounded_on_a_file_of_millions_of_rows(tmp_path):
    rows = 2_000_000
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.writelines("".join(f'{{"anchor": "question {i}", "positive": "a short answer to {i}"}}\n'
                             for i in range(start, start + 100_000)) for start in range(0, rows, 100_000))
    size_mib = path.stat().st_size / 2**20
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(rows)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"streamed {rows:,} rows ({size_mib:.0f} MiB) on rank 0 of 2: peak RSS {probe['rss_peak_mib']:.0f} MiB "
          f"(after imports {probe['rss_before_mib']:.0f} MiB)")
    assert probe["rows_seen"] == (rows // 4096) * 2048
    assert probe["rss_peak_mib"] - probe["rss_before_mib"] < size_mib / 4  # a window, not the file
