"""The blockwise loss core: its log-sum-exp, its duplicate pairs, its blocks, its metrics and its precision option.

The losses' values and gradients against sentence-transformers and the
full-matrix reference are test_losses.py's and test_guided_oracle.py's; here
the core's parts are checked against brute force, and the block path (logits
recomputed per block of candidates) against the kept path (a tile's logits
whole), for every loss setting.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ds_contrastive import GuidedInfoNCE, InfoNCE, Matryoshka
from ds_contrastive.losses.blockwise import equal_pairs, logsumexp_of, online_logsumexp, union_pairs

N, D = 13, 8


def test_online_logsumexp_equals_torch_logsumexp():
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 30
    masked = torch.rand(6, 40) < 0.5
    masked[1] = True
    masked[1, 33] = False  # one candidate left (a row whose negatives are all masked: only its positive)
    masked[2, :20] = True  # its first blocks hold nothing at all
    logits = logits.masked_fill(masked, -torch.inf)
    for width in (1, 7, 20, 40):
        state = (torch.full((6,), -torch.inf), torch.zeros(6))
        for c in range(0, 40, width):
            state = online_logsumexp(state, logits[:, c:c + width])
        assert torch.allclose(logsumexp_of(state), torch.logsumexp(logits, dim=1), rtol=1e-6, atol=1e-6)
    assert logsumexp_of(state)[1] == logits[1, 33]


@pytest.mark.parametrize("skip_own", [True, False])
def test_equal_pairs_are_the_brute_force_pairs_collisions_included(skip_own):
    g = torch.Generator().manual_seed(1)
    cols = torch.randint(0, 9, (60,), generator=g)  # few distinct values: many equal hashes, as colliding texts'
    rows = torch.cat([cols[:20], torch.randint(0, 12, (5,), generator=g)])
    got = set(zip(*(t.tolist() for t in equal_pairs(rows, cols, skip_own))))
    want = {(i, j) for i in range(len(rows)) for j in range(len(cols))
            if rows[i] == cols[j] and not (skip_own and i == j)}
    assert got == want and len(want) > 100
    r, c = equal_pairs(rows, cols, skip_own)
    assert torch.equal(r * 60 + c, torch.sort(r * 60 + c).values)  # sorted by row (then column)
    u = union_pairs((r, c), (torch.arange(25), torch.arange(25)), cols=60)
    assert set(zip(*(t.tolist() for t in u))) == want | {(i, i) for i in range(25)}


def batch(columns, seed, duplicates=True):
    """Embeddings [N, C, D] with texts repeated across rows and columns (hashes as the step makes them)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(N, columns, D, generator=g)
    emb[:, 1] += emb[:, 0]  # positives near their anchors
    hashes = torch.arange(N * columns).view(columns, N).T.contiguous()
    if duplicates:
        for (r, c), (r2, c2) in (((4, 1), (1, 1)), ((8, columns - 1), (1, 1)), ((10, 0), (3, 0)), ((6, 1), (6, 0))):
            emb[r, c], hashes[r, c] = emb[r2, c2], hashes[r2, c2]
    return emb, hashes


LOSSES = {
    "infonce": lambda **kw: InfoNCE(**kw),
    "all_directions": lambda **kw: InfoNCE(directions=("query_to_doc", "query_to_query", "doc_to_query",
                                                       "doc_to_doc"), **kw),
    "per_direction": lambda **kw: InfoNCE(directions=("query_to_doc", "doc_to_query"), partition="per_direction",
                                          **kw),
    "dot": lambda **kw: InfoNCE(similarity="dot", temperature=1.0, **kw),
    "self_guided": lambda **kw: GuidedInfoNCE(guide="self", temperature=0.05, margin=0.05, **kw),
    "self_guided_relative": lambda **kw: GuidedInfoNCE(guide="self", temperature=0.05, margin=0.1,
                                                       margin_strategy="relative", contrast_anchors=False, **kw),
    "matryoshka": lambda **kw: Matryoshka(InfoNCE(directions=("query_to_doc", "doc_to_doc"), **kw), dims=(8, 4)),
}


@pytest.mark.parametrize("name, columns", itertools.product(LOSSES, (2, 4)))
def test_blocks_equal_the_kept_tile(name, columns):
    """Logits recomputed block by block (odd widths, several tiles) give the kept tile's loss, gradients and sums."""
    emb, hashes = batch(columns, seed=columns)
    scale = 1.0 if name == "dot" else 20.0
    kept = LOSSES[name]().compute(emb, hashes, 2, 9, scale)
    blocks = LOSSES[name](tile_rows=4, tile_elements=4 * 5).compute(emb, hashes, 2, 9, scale)
    assert set(kept.sums) == set(blocks.sums)
    for key, value in kept.sums.items():
        assert blocks.sums[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert float((blocks.grad - kept.grad).norm() / kept.grad.norm()) < 1e-5  # the same sums, in another order
    assert blocks.grad_scale == pytest.approx(kept.grad_scale, rel=1e-5, abs=1e-6)  # a difference of sums ~1


@pytest.mark.parametrize("name", LOSSES)
def test_many_duplicates_are_compared_per_block_alike(name, monkeypatch):
    """Past PAIRS_PER_CANDIDATE the duplicates are compared per block instead of listed: the same loss and metrics."""
    from ds_contrastive.losses import blockwise

    emb, hashes = batch(3, seed=11)
    hashes[:6, 1] = hashes[0, 1]  # six rows share one positive text (and its embedding)
    emb[:6, 1] = emb[0, 1]
    scale = 1.0 if name == "dot" else 20.0
    listed = LOSSES[name](tile_rows=4, tile_elements=4 * 5).compute(emb, hashes, 1, 11, scale)
    monkeypatch.setattr(blockwise, "PAIRS_PER_CANDIDATE", -1)
    compared = LOSSES[name](tile_rows=4, tile_elements=4 * 5).compute(emb, hashes, 1, 11, scale)
    assert listed.sums.keys() == compared.sums.keys()
    for key, value in listed.sums.items():
        assert compared.sums[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert float((compared.grad - listed.grad).norm() / listed.grad.norm()) < 1e-5
    assert listed.sums.get("masked_duplicates", listed.sums.get("masked_duplicates@8")) >= 25  # rows 1-5: 5 each


def brute_metrics(emb, hashes, scale):
    """query_to_doc's metrics from the whole masked matrix: top-1 (argmax), the hardest other document, counts."""
    q, docs = F.normalize(emb[:, 0], dim=-1), F.normalize(emb[:, 1:].transpose(0, 1).reshape(-1, D), dim=-1)
    doc_hash = hashes[:, 1:].T.reshape(-1)
    logits = scale * q @ docs.T
    same = (doc_hash[None, :] == doc_hash[:N, None]) & (torch.arange(len(docs))[None, :] != torch.arange(N)[:, None])
    logits = logits.masked_fill(same, -torch.inf)
    rows = torch.arange(N)
    others = logits.clone()
    others[rows, rows] = -torch.inf
    hardest = others.max(dim=1).values
    return {"correct": float((logits.argmax(dim=1) == rows).sum()), "masked_duplicates": float(same.sum()),
            "candidates": float(torch.isfinite(logits).sum() - N),
            "positive_similarity": float(logits[rows, rows].sum() / scale),
            "hardest_negative_similarity": float(hardest[torch.isfinite(hardest)].sum() / scale),
            "rows_with_negatives": float(torch.isfinite(hardest).sum())}


@pytest.mark.parametrize("tile_elements", [1 << 25, 3 * 4])
def test_metrics_equal_the_whole_matrix(tile_elements):
    emb, hashes = batch(3, seed=7)
    emb[2, 1] = emb[5, 2] = emb[2, 0]  # ties: row 2's positive and a later document score alike (correct)
    emb[7, 1] = emb[3, 1] = emb[7, 0]  # row 7's positive and an earlier document (argmax: not correct)
    emb[9, 2] = emb[9, 0] * 2  # row 9's hardest negative beats its positive
    sums = InfoNCE(tile_rows=3, tile_elements=tile_elements).compute(emb, hashes, 0, N, 20.0).sums
    for key, value in brute_metrics(emb, hashes, 20.0).items():
        assert sums[key] == pytest.approx(value, rel=1e-5), key
    assert sums["correct"] < N - 1  # rows 7 and 9


def test_precision_options_and_their_error():
    """tf32 is CUDA's (the CPU computes fp32); bf16 rounds the product inputs (fp32 accumulation, fp32 log-sum-exp).

    Documented bound (cosine similarity, unit vectors): each logit moves by at most scale * 2**-8, so the loss of a
    row by at most twice that; the gradient's relative error stays below 2e-2 here.
    """
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(256, 3, 64, generator=g)
    emb[:, 1] += emb[:, 0]
    hashes = torch.arange(256 * 3).view(3, 256).T.contiguous()
    exact = InfoNCE().compute(emb, hashes, 0, 256, 20.0)
    assert torch.equal(InfoNCE(precision="tf32").compute(emb, hashes, 0, 256, 20.0).grad, exact.grad)
    low = InfoNCE(precision="bf16").compute(emb, hashes, 0, 256, 20.0)
    loss_error = abs(low.sums["loss"] - exact.sums["loss"]) / 256
    assert 0 < loss_error <= 2 * 20.0 * 2**-8, loss_error
    grad_error = float((low.grad - exact.grad).norm() / exact.grad.norm())
    assert grad_error < 2e-2, grad_error
    with pytest.raises(ValueError, match="precision"):
        InfoNCE(precision="fp8")
    assert math.isfinite(low.grad_scale)


def test_loss_precision_is_an_option_of_both_scripts():
    from ds_contrastive.run.config import load_train_config
    from ds_contrastive.run.setup import build_loss

    assert build_loss(load_train_config(None, {"loss_precision": "bf16"})).precision == "bf16"
    assert build_loss(load_train_config(None, {"guide": "self", "loss_precision": "tf32"})).precision == "tf32"
    with pytest.raises(ValueError, match="precision must be one of"):
        build_loss(load_train_config(None, {"loss_precision": "half"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's tf32 and bf16 kernels")
def test_precision_options_on_cuda():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(4096, 3, 256, generator=g)
    emb[:, 1] += emb[:, 0]
    emb, hashes = emb.cuda(), torch.arange(4096 * 3).view(3, 4096).T.contiguous().cuda()
    exact = InfoNCE().compute(emb, hashes, 0, 4096, 20.0)
    for precision in ("tf32", "bf16"):
        low = InfoNCE(precision=precision).compute(emb, hashes, 0, 4096, 20.0)
        assert abs(low.sums["loss"] - exact.sums["loss"]) / 4096 <= 2 * 20.0 * 2**-8, precision
        assert float((low.grad - exact.grad).norm() / exact.grad.norm()) < 2e-2, precision
