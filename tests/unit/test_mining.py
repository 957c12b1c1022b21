"""``ds-contrastive mine`` in one process: the search's ranking and ties, each selection rule, the atomic output,
the report, bad inputs, and the chosen negatives against sentence-transformers' ``mine_hard_negatives``."""

import json
import random

import numpy as np
import pytest
import torch

from ds_contrastive.errors import ConfigError, DataError
from ds_contrastive.mining.miner import MiningOptions, mine
from ds_contrastive.mining.output import MinedWriter
from ds_contrastive.mining.report import ScoreReport
from ds_contrastive.mining.rules import SelectionRules, select
from ds_contrastive.mining.search import PAD_KEY, decode, exact_scores, merge, ranking_keys, top_k


def brute_force(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every score at once, fully sorted by (score descending, index ascending): the documented ranking."""
    scores = exact_scores(queries, corpus).numpy()
    index = np.broadcast_to(np.arange(len(corpus)), scores.shape)
    order = np.lexsort((index, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_keys_order_by_score_then_lower_index_and_decode_back():
    scores = torch.tensor([0.5, -0.0, 0.0, -0.25, -2.0, 0.5, float("-inf"), 1.0])
    indices = torch.tensor([7, 3, 1, 0, 2, 4, 5, 6])
    keys = ranking_keys(scores, indices)
    order = torch.argsort(keys, descending=True)
    assert indices[order].tolist() == [6, 4, 7, 1, 3, 0, 2, 5]  # 0.0 and -0.0 are one score: lower index first
    back_scores, back_indices = decode(keys)
    assert torch.equal(back_indices, indices) and torch.equal(back_scores, scores + 0.0)
    assert decode(torch.tensor([PAD_KEY]))[1].item() == -1


@pytest.mark.parametrize("world_size,tile", [(1, 1000), (2, 3), (3, 7), (4, 1)])
def test_tiled_sharded_search_equals_brute_force_with_ties(world_size, tile):
    g = torch.Generator().manual_seed(world_size)
    distinct = torch.randint(-4, 5, (25, 6), generator=g).float() / 8  # few values: many exactly equal scores
    corpus = distinct[torch.randint(0, 25, (120,), generator=g)]  # repeated rows tie exactly
    queries = torch.randint(-4, 5, (17, 6), generator=g).float() / 8
    k = 30
    owner = torch.randint(0, world_size, (len(corpus),), generator=g)  # shares that are not contiguous
    parts = [top_k(queries, corpus[owner == r], torch.nonzero(owner == r)[:, 0], k, tile) for r in range(world_size)]
    scores, indices = decode(merge(parts, k))
    expected_scores, expected_indices = brute_force(queries, corpus, k)
    assert np.array_equal(indices.numpy(), expected_indices) and np.array_equal(scores.numpy(), expected_scores)
    tied = (expected_scores[:, 1:] == expected_scores[:, :-1]).sum()
    assert tied > 100  # the ties were there to break


def test_search_pads_when_the_corpus_is_smaller_than_k():
    scores, indices = decode(top_k(torch.ones(2, 3), torch.eye(3), torch.tensor([4, 0, 9]), 5, 2))
    assert indices.tolist() == [[0, 4, 9, -1, -1]] * 2 and torch.isinf(scores[:, 3:]).all()


def candidates() -> tuple[torch.Tensor, torch.Tensor]:
    """One query's ranked candidates (index, score), best first; its positive is index 2."""
    indices = torch.tensor([[5, 2, 9, 4, 7, 1, 3, 8]])
    scores = torch.tensor([[0.9, 0.8, 0.8, 0.7, 0.5, 0.3, 0.1, -0.2]])
    return scores, indices


def chosen(rules: SelectionRules, least_positive: float = 0.8, window_end: int = 8, seed: int = 0):
    scores, indices = candidates()
    return select(scores, indices, torch.tensor([[2]]), torch.tensor([least_positive]), rules, window_end,
                  random.Random(seed))


@pytest.mark.parametrize("rules,least_positive,expected,skipped", [
    (SelectionRules(num_negatives=3), 0.8, [5, 9, 4], {}),  # the positive (2) is never chosen
    (SelectionRules(num_negatives=2, absolute_margin=0.2), 0.8, [7, 1], {"absolute_margin": 3}),  # s + 0.2 > 0.8
    (SelectionRules(num_negatives=2, relative_margin=0.05), 0.8, [4, 7], {"relative_margin": 2}),  # s > 0.76
    (SelectionRules(num_negatives=1, relative_margin=0.5), -0.1, [8], {"relative_margin": 6}),  # s > -0.15: |pos|
    (SelectionRules(num_negatives=2, max_score=0.75), 0.8, [4, 7], {"max_score": 2}),
    (SelectionRules(num_negatives=6, min_score=0.2), 0.8, None, {"min_score": 2}),  # 6 wanted, 5 left: dropped
    (SelectionRules(num_negatives=2, range_min=2), 0.8, [4, 7], {}),  # skips the best two non-positives
    (SelectionRules(num_negatives=2, range_min=1, range_max=3), 0.8, [9, 4], {}),
])
def test_each_rule_excludes_what_it_documents(rules, least_positive, expected, skipped):
    result = chosen(rules, least_positive, rules.window_end(1))
    assert result.skipped == skipped
    if expected is None:
        assert not result.found[0]
    else:
        assert result.found[0] and result.indices[0].tolist() == expected
        assert (result.scores[0, :-1] >= result.scores[0, 1:]).all()


def test_random_sampling_draws_within_the_window_best_first_as_sentence_transformers_calls_random():
    rules = SelectionRules(num_negatives=3, range_max=6, sampling_strategy="random")
    result = chosen(rules, window_end=6, seed=11)
    positions = sorted(random.Random(11).sample(range(6), k=3))  # the window: 5 9 4 7 1 3 (positive 2 removed)
    assert result.indices[0].tolist() == [[5, 9, 4, 7, 1, 3][p] for p in positions]


@pytest.mark.parametrize("rules,message", [
    (SelectionRules(num_negatives=0), "num_negatives must be at least 1"),
    (SelectionRules(range_min=-1), "range_min must be non-negative"),
    (SelectionRules(range_min=5, range_max=5), "range_min must be smaller than range_max"),
    (SelectionRules(num_negatives=4, range_min=2, range_max=5), "cannot mine 4 negatives per query"),
    (SelectionRules(sampling_strategy="best"), "sampling_strategy must be one of"),
])
def test_rules_refuse_what_sentence_transformers_refuses(rules, message):
    with pytest.raises(ConfigError, match=message):
        rules.check(max_positives=1)


def test_default_range_max_is_sentence_transformers():
    assert SelectionRules(num_negatives=3).window_end(2) == 5
    assert SelectionRules(num_negatives=3, range_min=4, relative_margin=0.05).window_end(2) == 36


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_output_appears_only_when_complete(tmp_path, suffix):
    path = tmp_path / f"mined{suffix}"
    (tmp_path / f".mined{suffix}.99999.partial").write_text("left by a killed run")
    with pytest.raises(RuntimeError), MinedWriter(path, "q", "d", 2) as writer:
        writer.write([["a", "b", "c", "d"]], [[0.5, 0.4, 0.3]])
        raise RuntimeError("killed mid-run")
    assert list(tmp_path.iterdir()) == []  # no output, no partial file, the old leftover gone
    with MinedWriter(path, "q", "d", 2) as writer:
        writer.write([["a", "b", "c", "d"]], [[0.5, 0.4, 0.3]])
        assert not path.exists()
        writer.commit()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    assert rows[0]["negative_2"] == "d" and rows[0]["scores"] == pytest.approx([0.5, 0.4, 0.3])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    from ds_contrastive.data.files import load_pairs  # training reads it as it is (the scores column ignored)

    assert load_pairs(str(path), ["q", "d", "negative_1", "negative_2"]) == {"q": ["a"], "d": ["b"],
                                                                            "negative_1": ["c"], "negative_2": ["d"]}


def test_report_table_and_plot(tmp_path):
    report = ScoreReport()
    report.add(np.array([0.9, 0.8, 0.7], np.float32), np.array([[0.5, 0.4], [0.6, 0.3], [0.2, 0.1]], np.float32),
               np.array([True, True, False]), {"max_score": 4}, 20)
    table = report.table({"max_score": 0.85})
    lines = [line.split() for line in table.splitlines()]
    assert lines[1] == ["Count", "3", "4"] and lines[2] == ["Mean", "0.8000", "0.4500", "0.4000"]
    assert "Skipped 4 potential negatives (20.00%) due to the max_score of 0.85." in table
    assert "Could not find enough negatives for 1 rows (33.33%)" in table
    report.plot(tmp_path / "scores.png")
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


PAIRS = [{"anchor": f"query {i}", "positive": f"document {i}"} for i in range(4)]


@pytest.mark.parametrize("change,error,message", [
    (lambda t: {"pairs": write_jsonl(t / "p.jsonl", [{"anchor": "q", "doc": "d"}])}, DataError,
     r"p.jsonl line 1: no column\(s\) \['positive'\] \(columns: \['anchor', 'doc'\]\)"),
    (lambda t: {"pairs": write_jsonl(t / "p.jsonl", PAIRS + [{"anchor": "q", "positive": "  "}])}, DataError,
     "p.jsonl line 5: column 'positive' is empty"),
    (lambda t: {"pairs": write_jsonl(t / "p.jsonl", PAIRS + [PAIRS[1]])}, DataError,
     r"rows 1 and 4 \(0-based\) hold the same \(anchor, positive\) pair"),
    (lambda t: {"rules": SelectionRules(num_negatives=4)}, DataError,
     "the corpus holds 4 distinct texts .* fewer than num_negatives=4 plus the 1 positive"),
    (lambda t: {"corpus": write_jsonl(t / "c.jsonl", [{"text": "x"}]), "corpus_column": "body"}, DataError,
     r"c.jsonl line 1: no column\(s\) \['body'\]"),
    (lambda t: {"output": write_jsonl(t / "out.jsonl", [])}, ConfigError, "out.jsonl exists; pass --overwrite"),
    (lambda t: {"output": str(t / "out.csv")}, ConfigError, "unknown extension '.csv'"),
    (lambda t: {"model": str(t)}, ConfigError, "holds no saved model"),
])
def test_bad_inputs_name_the_problem(tmp_path, change, error, message):
    options = {"pairs": write_jsonl(tmp_path / "pairs.jsonl", PAIRS), "output": str(tmp_path / "mined.jsonl")}
    with pytest.raises(error, match=message):
        mine(MiningOptions(**{**options, **change(tmp_path)}))


ST_CASES = [dict(num_negatives=3),
            dict(num_negatives=2, range_min=2, range_max=20, relative_margin=0.05),
            dict(num_negatives=3, absolute_margin=0.1, max_score=0.8, min_score=0.1),
            dict(num_negatives=2, range_max=15, sampling_strategy="random")]


def test_negatives_equal_sentence_transformers_mine_hard_negatives(tmp_path):
    """The packaged MiniLM, 100 stdlib pairs (two anchors repeated with another positive) and a separate corpus.

    Equal rows, in sentence-transformers' order, and the same negatives; scores within 1e-6 (its float32 cosine
    against the float64-summed score here). Random sampling equals too: the same ``random`` calls in the same order.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from ds_contrastive.mining.inputs import read_pairs
    from ds_contrastive.run.setup import load_model

    anchors, positives = read_pairs("builtin:stdlib", "anchor", "positive")
    corpus = [t[:160] for t in positives[100:160]] + [t[:160] for t in positives[:5]]
    anchors, positives = anchors[:100] + [anchors[0], anchors[5]], [t[:160] for t in positives[:100]]
    positives += [positives[7], positives[9]]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"q": a, "d": p} for a, p in zip(anchors, positives)])
    corpus_file = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in corpus])
    model = load_model("builtin:all-MiniLM-L6-v2")
    for case in ST_CASES:
        random.seed(7)
        expected = mine_hard_negatives(Dataset.from_dict({"q": anchors, "d": positives}), model, corpus=corpus,
                                       output_format="n-tuple", output_scores=True, verbose=False, **case)
        output = tmp_path / "mined.jsonl"
        mine(MiningOptions(pairs=pairs, output=str(output), anchor_column="q", positive_column="d",
                           corpus=corpus_file, corpus_column="text", rules=SelectionRules(**case), seed=7,
                           overwrite=True, progress=False, plot=False))
        ours = [json.loads(line) for line in output.read_text().splitlines()]
        columns = ["q", "d", *(f"negative_{i}" for i in range(1, case["num_negatives"] + 1))]
        assert [[r[c] for c in columns] for r in ours] == [[r[c] for c in columns] for r in expected], case
        assert 50 < len(ours) <= 102
        difference = max(np.abs(np.subtract(a["scores"], b["scores"])).max() for a, b in zip(ours, expected))
        assert difference < 1e-6, case


def test_faiss_search_equals_exact_search_without_near_ties():
    """``--search faiss`` (installed or skipped): the same top-k as the exact search where no two scores are close."""
    pytest.importorskip("faiss")
    from ds_contrastive.mining.search import faiss_top_k

    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1)
    owner = torch.arange(300) % 3
    exact = [top_k(queries, corpus[owner == r], torch.nonzero(owner == r)[:, 0], 12, 50) for r in range(3)]
    fast = [faiss_top_k(corpus[owner == r], torch.nonzero(owner == r)[:, 0], 12)(queries) for r in range(3)]
    exact_scores_, exact_indices = decode(merge(exact, 12))
    fast_scores, fast_indices = decode(merge(fast, 12))
    assert torch.equal(fast_indices, exact_indices) and torch.allclose(fast_scores, exact_scores_, atol=1e-6)
