"""InfoNCE against sentence-transformers' MultipleNegativesRankingLoss (the oracle) and the plain reference."""

import itertools

import pytest
import torch
from helpers import corpus, load_model
from reference import reference_loss
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim, dot_score

from ds_contrastive import InfoNCE

N, D = 12, 16
DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]


@pytest.fixture(scope="module")
def st_model(tiny_model_dir):
    return load_model(tiny_model_dir)


def ours(emb, hashes, loss, scale, first=0, rows=None):
    rows = emb.shape[0] if rows is None else rows
    r = loss.compute(emb, hashes, first, rows, scale)
    return r.sums["loss"] / emb.shape[0], r.grad, r


def assert_rel(got, want, tol=1e-5):
    """Relative error of the whole tensor (elementwise relative error is meaningless near zero)."""
    err = float((got - want).norm() / want.norm())
    assert err <= tol, err


def distinct_hashes(n, c):
    return torch.arange(n * c, dtype=torch.int64).view(c, n).T.contiguous()


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("directions", DIRECTION_SETS)
@pytest.mark.parametrize("partition", ["joint", "per_direction"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_matches_sentence_transformers(st_model, negatives, directions, partition, similarity):
    if partition == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        with pytest.raises(ValueError, match="per_direction"):
            InfoNCE(directions=directions, partition=partition)
        return
    torch.manual_seed(0)
    emb = torch.randn(N, 2 + negatives, D) * (0.3 if similarity == "dot" else 1.0)
    temperature = 0.05 if similarity == "cosine" else 1.0
    loss = InfoNCE(temperature=temperature, directions=directions, partition=partition, similarity=similarity,
                   tile_rows=5)
    value, grad, _ = ours(emb, distinct_hashes(N, 2 + negatives), loss, 1 / temperature)

    oracle = MultipleNegativesRankingLoss(st_model, scale=1 / temperature, directions=directions,
                                          partition_mode=partition,
                                          similarity_fct=cos_sim if similarity == "cosine" else dot_score)
    leaf = emb.clone().requires_grad_()
    expected = oracle.compute_loss_from_embeddings([leaf[:, c] for c in range(leaf.shape[1])], None)
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert_rel(grad, leaf.grad)


def test_tiles_do_not_change_the_result():
    torch.manual_seed(1)
    emb = torch.randn(N, 3, D)
    hashes = distinct_hashes(N, 3)
    base = InfoNCE(directions=DIRECTION_SETS[-1], tile_rows=N)
    for tile in (1, 4, 7):
        tiled = InfoNCE(directions=DIRECTION_SETS[-1], tile_rows=tile)
        v0, g0, r0 = ours(emb, hashes, base, 20.0)
        v1, g1, r1 = ours(emb, hashes, tiled, 20.0)
        assert v0 == pytest.approx(v1, rel=1e-6)
        assert_rel(g1, g0, 1e-6)
        assert r0.grad_scale == pytest.approx(r1.grad_scale, rel=1e-5)


def test_row_ranges_sum_to_the_whole_batch():
    """What ranks compute separately (their own rows) adds up to the full-batch loss and gradient."""
    torch.manual_seed(2)
    emb, hashes, loss = torch.randn(N, 2, D), distinct_hashes(N, 2), InfoNCE()
    full_value, full_grad, full = ours(emb, hashes, loss, 20.0)
    parts = [ours(emb, hashes, loss, 20.0, first, rows) for first, rows in ((0, 5), (5, 4), (9, 3))]
    assert sum(p[0] for p in parts) == pytest.approx(full_value, rel=1e-6)
    assert_rel(sum(p[1] for p in parts), full_grad, 1e-6)
    assert sum(p[2].grad_scale for p in parts) == pytest.approx(full.grad_scale, rel=1e-5)


@pytest.mark.parametrize("directions", [DIRECTION_SETS[0], DIRECTION_SETS[-1]])
def test_duplicates_masked_and_scale_gradient(directions):
    texts = corpus(N, 1, seed=5)
    texts["positive"][4] = texts["positive"][1]  # same positive text in two rows
    texts["negative_0"][8] = texts["positive"][1]  # and as someone's hard negative
    texts["anchor"][10] = texts["anchor"][3]
    from ds_contrastive.core.shard import text_hashes

    columns = list(texts.values())
    hashes = text_hashes([t for col in columns for t in col]).view(3, N).T.contiguous()
    torch.manual_seed(3)
    emb = torch.randn(N, 3, D)
    emb[:, 1] = emb[:, 0] + 0.3 * emb[:, 1]  # positives near their anchors
    emb[4, 1] = emb[8, 2] = emb[1, 1]  # the same text embeds the same
    emb[10, 0] = emb[3, 0]
    loss = InfoNCE(directions=directions, tile_rows=5)
    value, grad, result = ours(emb, hashes, loss, 20.0)
    assert result.sums["masked_duplicates"] == 4  # rows 1 and 4 each see two other copies of their positive text

    leaf, scale = emb.clone().requires_grad_(), torch.tensor(20.0, requires_grad=True)
    expected = reference_loss(leaf, columns, scale, directions, mask_duplicates=True)
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-5)
    assert_rel(grad, leaf.grad)
    assert result.grad_scale == pytest.approx(scale.grad.item(), rel=1e-5)

    unmasked = InfoNCE(directions=directions, mask_duplicates=False)
    assert ours(emb, hashes, unmasked, 20.0)[0] != pytest.approx(value, rel=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(directions=("doc_to_doc",)), "query_to_doc"),
        (dict(directions=("query_to_doc", "sideways")), "directions"),
        (dict(partition="both"), "partition"),
        (dict(similarity="l2"), "similarity"),
        (dict(temperature=0.005, min_temperature=0.01), "min_temperature"),
        (dict(tile_rows=0), "tile_rows"),
        (dict(temperature=0.01, min_temperature=0.01, learnable_temperature=True), "cannot move"),
    ],
)
def test_bad_loss_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InfoNCE(**kwargs)


def test_guided_refuses_what_it_cannot_do(st_model):
    from ds_contrastive import GuidedInfoNCE, Matryoshka

    with pytest.raises(ValueError, match="partition='joint'"):
        GuidedInfoNCE(guide=st_model, partition="per_direction")
    with pytest.raises(ValueError, match="contrast_anchors"):
        GuidedInfoNCE(guide=st_model, directions=("query_to_doc", "doc_to_query"))
    with pytest.raises(ValueError, match="margin_strategy"):
        GuidedInfoNCE(guide=st_model, margin_strategy="soft")
    with pytest.raises(ValueError, match="needs a guide"):
        GuidedInfoNCE()
    with pytest.raises(ValueError, match="weights"):
        Matryoshka(InfoNCE(), dims=(32, 16), weights=(1.0,))
    with pytest.raises(ValueError, match="distinct"):
        Matryoshka(InfoNCE(), dims=(16, 16))


def test_all_direction_sets_are_accepted():
    for r in range(1, 4):
        for extra in itertools.combinations(DIRECTION_SETS[-1][1:], r):
            InfoNCE(directions=("query_to_doc", *extra))
