"""Bad input gives a clear error naming the problem, on every rank, and the engine stays usable."""

import math

import pytest

from jobs import run_worker

BATCH_CASES = {
    "empty_batch": "rank 1: empty batch",
    "missing_column": "different columns",
    "different_lengths": "rank 1: columns have different lengths",
    "empty_string": "rank 1: column 'anchor' row 5: empty string",
    "non_string": "rank 1: column 'positive' row 0: expected a string, got NoneType",
    "not_a_mapping": "rank 1: a batch must be a mapping",
    "string_column": "rank 1: column 'anchor' must be a list of strings",
}
CONFIG_CASES = {
    "gas_4": "gradient_accumulation_steps=4 is refused",
    "fp16": "fp16 is not supported",
    "zero_4": "zero_optimization.stage=4",
    "micro_batch_8": "train_micro_batch_size_per_gpu=8",
}


@pytest.fixture(scope="module")
def per_rank(tiny_model_dir, tmp_path_factory):
    return run_worker("bad_input", 2, tiny_model_dir, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_bad_batch_raises_on_every_rank(per_rank, case):
    for rank, result in enumerate(per_rank):
        assert result[case] is not None, f"rank {rank} did not raise for {case}"
        assert BATCH_CASES[case] in result[case], result[case]
    assert per_rank[0][case] == per_rank[1][case]


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_refused(per_rank, case):
    for result in per_rank:
        assert result[case] is not None and CONFIG_CASES[case] in result[case], result[case]


def test_training_files_that_differ_between_ranks_are_refused_on_every_rank(per_rank):
    for result in per_rank:
        assert result["different_files"] == ("ranks read different training data (rank 0: 3 rows, rank 1: 4 rows); "
                                             "give every rank the same files")


def test_engine_still_trains_after_bad_batches(per_rank):
    assert all(math.isfinite(r["good_after_errors"]) for r in per_rank)
    assert per_rank[0]["good_after_errors"] == per_rank[1]["good_after_errors"]
    assert all(r["steps"] == 1 for r in per_rank)  # failed steps did not count
