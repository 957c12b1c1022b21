"""Several datasets in one run: one dataset per global batch, drawn by weight, each example once per its epoch."""

from collections import Counter

import pytest

from ds_contrastive.data.files import GlobalBatches
from ds_contrastive.data.mixture import MixedBatches, Source
from ds_contrastive.errors import DataError


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
