"""Several datasets in one run: one dataset per global batch, drawn by weight, each example once per its epoch."""

import json
from collections import Counter

import pytest
from helpers import corpus

from ds_contrastive.data.files import GlobalBatches
from ds_contrastive.data.mixture import MixedBatches, Source
from ds_contrastive.errors import DataError
from jobs import ROOT, run_deepspeed


def dataset(name: str, rows: int, negatives: int = 0) -> dict[str, list[str]]:
    data = {"q": [f"{name} q{i}" for i in range(rows)], "d": [f"{name} d{i}" for i in range(rows)]}
    for k in range(negatives):
        data[f"n{k}"] = [f"{name} n{k}-{i}" for i in range(rows)]
    return data


def mixture(seed: int = 0, drop_last: bool = True) -> MixedBatches:
    return MixedBatches([
        Source("qa", GlobalBatches(dataset("qa", 40, negatives=1), 8, seed, drop_last), 5.0, "q", "d",
               query_prefix="query: ", document_prefix="passage: "),
        Source("code", GlobalBatches(dataset("code", 30), 6, seed, drop_last), 3.0, "q", "d"),
        Source("nli", GlobalBatches(dataset("nli", 23), 4, seed, drop_last), 2.0, "q", "d"),
    ], seed)


def test_each_global_batch_comes_from_one_dataset_with_its_prefixes_and_columns():
    mix = mixture()
    for step in range(60):
        shards = [mix.shard(step, rank, 2) for rank in range(2)]
        names = {name for name, _ in shards}
        assert len(names) == 1, (step, names)  # every rank draws the same dataset
        name = names.pop()
        texts = [t for _, shard in shards for column in shard.values() for t in column]
        assert all(t.removeprefix("query: ").removeprefix("passage: ").startswith(name) for t in texts)
        columns = list(shards[0][1])
        if name == "qa":
            assert columns == ["anchor", "positive", "negative_1"]
            assert all(t.startswith("query: ") for t in shards[0][1]["anchor"])
            assert all(t.startswith("passage: ") for t in shards[0][1]["positive"] + shards[0][1]["negative_1"])
        else:
            assert columns == ["anchor", "positive"]


def test_dataset_frequencies_follow_the_weights():
    # 4,000 draws: the standard error of a frequency is at most 0.008; the tolerance is 0.03 (> 3.7 sigma)
    mix = mixture(seed=1)
    counts = Counter(mix.position(step)[0] for step in range(4000))
    for d, p in enumerate(mix.probabilities):
        assert abs(counts[d] / 4000 - p) < 0.03, (d, counts, mix.probabilities)


def test_each_example_is_used_once_per_epoch_of_its_dataset():
    mix = mixture(seed=2, drop_last=False)
    seen: dict[str, list[str]] = {"qa": [], "code": [], "nli": []}
    for step in range(400):
        name, shard = mix.shard(step, 0, 1)
        seen[name].extend(shard["anchor"])
    for source in mix.sources:
        per_epoch = source.batches.rows
        rows = seen[source.name]
        epochs = len(rows) // per_epoch
        assert epochs >= 2, (source.name, len(rows))
        for e in range(epochs):
            anchors = [t.removeprefix("query: ") for t in rows[e * per_epoch:(e + 1) * per_epoch]]
            assert sorted(anchors) == sorted(f"{source.name} q{i}" for i in range(per_epoch)), (source.name, e)


def test_the_draws_depend_on_seed_and_step_only():
    full = [mixture(seed=3).position(step) for step in range(200)]
    resumed = mixture(seed=3)
    assert [resumed.position(step) for step in range(120, 200)] == full[120:]  # no state carried but the step
    assert [mixture(seed=4).position(step) for step in range(200)] != full


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_weights_are_refused(weight):
    with pytest.raises(DataError, match="weight must be a finite number > 0"):
        Source("x", GlobalBatches(dataset("x", 4), 2, 0), weight, "q", "d")


def test_bad_mixtures_are_refused():
    batches = GlobalBatches(dataset("x", 4), 2, 0)
    with pytest.raises(DataError, match="no anchor column 'question'"):
        Source("x", batches, 1.0, "question", "d")
    with pytest.raises(DataError, match="unique"):
        MixedBatches([Source("x", batches, 1.0, "q", "d"), Source("x", batches, 1.0, "q", "d")], 0)
    with pytest.raises(DataError, match="at least one"):
        MixedBatches([], 0)


def test_launch_train_on_two_datasets_logs_each(tiny_model_dir, tmp_path):
    """launch/train.py, 2 ranks: a 'qa' file with a hard negative and a 'nli' file with other column names."""
    qa, nli = corpus(24, 1, seed=21), corpus(16, 0, seed=22)
    with open(tmp_path / "qa.jsonl", "w") as f:
        for a, p, n in zip(qa["anchor"], qa["positive"], qa["negative_0"]):
            f.write(json.dumps({"anchor": a, "positive": p, "negative_0": n}) + "\n")
    with open(tmp_path / "nli.jsonl", "w") as f:
        for a, p in zip(nli["anchor"], nli["positive"]):
            f.write(json.dumps({"premise": a, "hypothesis": p}) + "\n")
    datasets = [{"path": str(tmp_path / "qa.jsonl"), "name": "qa", "weight": 2, "negative_columns": ["negative_0"],
                 "query_prefix": "query: ", "document_prefix": "passage: "},
                {"path": str(tmp_path / "nli.jsonl"), "weight": 1, "anchor_column": "premise",
                 "positive_column": "hypothesis"}]
    out = tmp_path / "run"
    run_deepspeed(ROOT / "launch/train.py", 2, [
        "--deepspeed_config", str(ROOT / "configs/deepspeed/zero2.json"), "--model", str(tiny_model_dir),
        "--datasets", json.dumps(datasets), "--eval_data", "null", "--global_batch_size", "8",
        "--max_steps", "6", "--chunk_tokens", "150", "--max_length", "32", "--progress_bar", "false",
        "--output_dir", str(out)], timeout=600)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))
    mix = MixedBatches([Source("qa", GlobalBatches(qa, 8, 42), 2.0), Source("nli", GlobalBatches(
        {"premise": nli["anchor"], "hypothesis": nli["positive"]}, 8, 42 + 1000), 1.0, "premise", "hypothesis")], 42)
    drawn = [mix.sources[mix.position(step)[0]].name for step in range(6)]
    assert set(drawn) == {"qa", "nli"}  # this seed draws both within 6 steps
    for line, name in zip(lines, drawn):  # each step logs the dataset it drew, and only that one
        assert line[f"train/{name}/loss"] == line["train/loss"]
        assert f"train/{'nli' if name == 'qa' else 'qa'}/loss" not in line
        assert 0.0 <= line[f"train/{name}/accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 40 and summary["steps"] == 6
