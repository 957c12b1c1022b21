"""Chunk planning: length-sorted, under the budget, and balanced to a common count across ranks."""

import pytest

from ds_contrastive.chunking import ChunkPlan, balance_chunk_count, chunk_seed, plan_chunks

LENGTHS = [5, 30, 12, 30, 7, 60, 3, 12]


def padded_tokens(chunk, lengths):
    return len(chunk.indices) * max(lengths[i] for i in chunk.indices)


def test_every_sequence_once_longest_first_under_the_budget():
    plan = plan_chunks(LENGTHS, token_budget=64, max_rows=None)
    order = [i for c in plan.chunks for i in c.indices]
    assert sorted(order) == list(range(len(LENGTHS)))
    assert [LENGTHS[i] for i in order] == sorted(LENGTHS, reverse=True)
    assert all(padded_tokens(c, LENGTHS) <= 64 for c in plan.chunks)
    assert order[:1] == [5]  # the 60-token sequence fits alone


def test_sequence_longer_than_the_budget_gets_its_own_chunk():
    plan = plan_chunks(LENGTHS, token_budget=40, max_rows=None)
    assert plan.chunks[0].indices == (5,)
    assert all(padded_tokens(c, LENGTHS) <= 40 for c in plan.chunks[1:])


def test_row_limit_and_both_limits():
    assert [len(c.indices) for c in plan_chunks(LENGTHS, None, 3).chunks] == [3, 3, 2]
    both = plan_chunks(LENGTHS, 100, 2)
    assert all(len(c.indices) <= 2 and padded_tokens(c, LENGTHS) <= 100 for c in both.chunks)


def test_ties_keep_input_order():
    assert [c.indices for c in plan_chunks([4, 4, 4], None, 1).chunks] == [(0,), (1,), (2,)]


@pytest.mark.parametrize("budget, rows, message", [(None, None, "chunk_tokens"), (0, None, "chunk_tokens"),
                                                   (None, 0, "chunk_rows")])
def test_bad_limits(budget, rows, message):
    with pytest.raises(ValueError, match=message):
        plan_chunks([3], budget, rows)


def test_balance_splits_the_widest_chunks_then_adds_dummies():
    plan = plan_chunks(LENGTHS, None, 8)
    balanced = balance_chunk_count(plan, 3)
    assert len(balanced) == 3 and not any(c.dummy for c in balanced.chunks)
    assert sorted(i for c in balanced.chunks for i in c.indices) == list(range(8))
    tiny = balance_chunk_count(plan_chunks([3, 4], None, 1), 4)
    assert [c.dummy for c in tiny.chunks] == [False, False, True, True]
    assert balance_chunk_count(plan, len(plan)).chunks == plan.chunks
    with pytest.raises(ValueError, match="cannot shrink"):
        balance_chunk_count(ChunkPlan(balanced.chunks), 2)


def test_chunk_seed_is_stable_and_distinct():
    assert chunk_seed(1, 2, 3, 4) == chunk_seed(1, 2, 3, 4)
    seeds = {chunk_seed(0, step, rank, chunk) for step in range(4) for rank in range(4) for chunk in range(4)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)
