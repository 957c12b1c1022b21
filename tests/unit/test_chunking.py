"""Chunk planning: length-sorted, within the limits, the fastest plan is optimal, counts balanced across ranks."""

import random
import time

import numpy as np
import pytest

from ds_contrastive.core.chunks import (
    Chunk,
    ChunkCosts,
    ChunkPlan,
    balance_chunk_count,
    chunk_seed,
    plan_chunks,
    plan_fastest,
    plan_fill,
)

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


def set_partitions(items: list[int]):
    """Every way to split ``items`` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for groups in set_partitions(rest):
        for i in range(len(groups)):
            yield groups[:i] + [[first, *groups[i]]] + groups[i + 1:]
        yield [[first], *groups]


def within_limits(groups, lengths, budget, rows) -> bool:
    return all((rows is None or len(g) <= rows) and (budget is None or len(g) == 1 or
                                                      len(g) * max(lengths[i] for i in g) <= budget) for g in groups)


def modelled(groups, lengths, costs) -> float:
    return sum(costs.of(len(g), max(lengths[i] for i in g)) for g in groups)


def test_fastest_plan_equals_the_brute_force_optimum():
    """Over every partition of the sequences into chunks (not only length-sorted ones), for many cost models."""
    rng = random.Random(0)
    for _ in range(250):
        n = rng.randint(1, 7)
        lengths = [rng.choice([2, 3, 5, 8, 8, 13, 20]) for _ in range(n)]
        costs = ChunkCosts(rng.choice([0.0, 0.5, 5.0, 50.0]), rng.choice([0.0, 0.1, 1.0]),
                           rng.choice([0.01, 0.05, 1.0]))
        budget = rng.choice([None, 10, 20, 40, 100])
        rows = rng.choice([1, 2, 3, 9]) if budget is None else rng.choice([None, 2, 3])
        plan = plan_fastest(lengths, costs, budget, rows)
        groups = [list(c.indices) for c in plan.chunks]
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert within_limits(groups, lengths, budget, rows)  # the cap holds
        best = min(modelled(p, lengths, costs) for p in set_partitions(list(range(n)))
                   if within_limits(p, lengths, budget, rows))
        assert modelled(groups, lengths, costs) == pytest.approx(best, rel=1e-12, abs=1e-12), (lengths, costs)


def test_fastest_plan_cuts_where_lengths_drop_and_never_exceeds_the_cap():
    lengths = [256] * 4 + [60] * 40 + [20] * 100
    fill = plan_fill(lengths, 4096, None)
    fastest = plan_fastest(lengths, ChunkCosts(call=1e-3, token=1e-5, attention=0.0), 4096, None)
    assert padded_fraction(fastest, lengths) == 0.0 < padded_fraction(fill, lengths)
    assert all(padded_tokens(c, lengths) <= 4096 for c in fastest.chunks)
    # a dear call merges lengths where the cap leaves room (60 and 20 under 16384; not 256 and 60), never past it
    merged = plan_fastest(lengths, ChunkCosts(call=10.0, token=1e-5, attention=0.0), 16384, None)
    assert [len(c.indices) for c in merged.chunks] == [4, 140]
    assert all(padded_tokens(c, lengths) <= 16384 for c in merged.chunks)


def padded_fraction(plan: ChunkPlan, lengths: list[int]) -> float:
    return 1 - sum(lengths) / sum(padded_tokens(c, lengths) for c in plan.chunks)


def test_balancing_by_cost_splits_where_it_costs_least_and_keeps_counts_equal():
    rng = random.Random(1)
    costs = ChunkCosts(call=1e-2, token=1e-5, attention=1e-8)
    shards = [[rng.randint(4, 200) for _ in range(rng.randint(5, 60))] for _ in range(4)]  # four ranks' shards
    plans = [plan_fastest(lengths, costs, 2048, None) for lengths in shards]
    count = max(len(p) for p in plans) + 3
    balanced = [balance_chunk_count(p, count, lengths, costs) for p, lengths in zip(plans, shards)]
    assert {len(p) for p in balanced} == {count}
    for plan, before, lengths in zip(balanced, plans, shards):
        real = [c for c in plan.chunks if not c.dummy]
        assert sorted(i for c in real for i in c.indices) == list(range(len(lengths)))
        assert all(padded_tokens(c, lengths) <= 2048 for c in real)
        halved = balance_chunk_count(before, count)  # the cost-blind rule
        assert (modelled([c.indices for c in real], lengths, costs) <=
                modelled([c.indices for c in halved.chunks if not c.dummy], lengths, costs) + 1e-12)
    # a cut where the lengths drop pays for itself: it is the one taken
    lengths = [100, 100, 10, 10, 10, 10]
    two = balance_chunk_count(ChunkPlan([Chunk(tuple(range(6)))]), 2, lengths, costs)
    assert [c.indices for c in two.chunks] == [(0, 1), (2, 3, 4, 5)]
    tiny = balance_chunk_count(plan_fastest([3, 4], costs, None, 1), 4, [3, 4], costs)
    assert [c.dummy for c in tiny.chunks] == [False, False, True, True]


def test_a_million_sequences_plan_in_a_fraction_of_a_step():
    """Planning time at 1M sequences per rank (printed; the bound is loose: a step at that size takes minutes)."""
    g = np.random.default_rng(0)
    queries = g.integers(6, 65, 500_000)
    documents = np.clip(np.exp(np.log(90) + 0.7 * g.standard_normal(500_000)).round(), 16, 512).astype(int)
    lengths = np.concatenate([queries, documents]).tolist()
    costs = ChunkCosts(call=2e-3, token=1e-6, attention=1e-9)
    start = time.perf_counter()
    plan = plan_fastest(lengths, costs, 131072, None)
    seconds = time.perf_counter() - start
    print(f"plan_fastest: 1M sequences in {seconds:.2f} s, {len(plan)} chunks, padding "
          f"{padded_fraction(plan, lengths):.5f}")
    assert seconds < 20
