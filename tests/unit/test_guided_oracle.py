"""GuidedInfoNCE against sentence-transformers' GISTEmbedLoss and CachedGISTEmbedLoss (one process).

Same tokenizer for guide and student (the case where sentence-transformers is
right): loss values and the student's parameter gradients must agree within
1e-5. The student is a tiny random BERT without dropout; the guide is the
packaged all-MiniLM-L6-v2, which shares the student's tokenizer.
"""

import pytest
import torch
from helpers import corpus, load_model, minilm_dir, tiny_bert_dir
from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss, GISTEmbedLoss

from ds_contrastive import Guide, GuidedInfoNCE
from ds_contrastive.core.shard import text_hashes

N, TEMPERATURE = 12, 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    student_dir = tiny_bert_dir(tmp_path_factory.mktemp("student"), seed=1, dropout=0.0)
    return student_dir, load_model(minilm_dir())


def ours(student, guide, texts, loss):
    columns = list(texts.values())
    emb = torch.stack([student(dict(student.tokenizer(col, padding=True, truncation=True, max_length=64,
                                                       return_tensors="pt")))["sentence_embedding"]
                       for col in columns], dim=1)
    guide_emb = None if loss.self_guided else torch.stack([loss.guide_model.embed(col) for col in columns], dim=1)
    hashes = text_hashes([t for col in columns for t in col]).view(len(columns), N).T.contiguous()
    result = loss.compute(emb.detach(), hashes, 0, N, 1 / TEMPERATURE, guide_emb)
    emb.backward(result.grad)
    return result.sums["loss"] / N, loss.summarize(result.sums, N)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("contrast", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("strategy, margin", [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.0),
                                              ("relative", 0.1)])
@pytest.mark.parametrize("cached", [False, True])
def test_matches_gist_embed_loss(models, negatives, contrast, strategy, margin, cached):
    student_dir, guide = models
    texts = corpus(N, negatives, seed=21)
    kwargs = dict(temperature=TEMPERATURE, margin_strategy=strategy, margin=margin,
                  contrast_anchors=contrast[0], contrast_positives=contrast[1])
    student = load_model(student_dir)
    value, metrics = ours(student, guide, texts, GuidedInfoNCE(guide=Guide(guide), **kwargs))

    oracle_student = load_model(student_dir)
    oracle = (CachedGISTEmbedLoss(oracle_student, guide, mini_batch_size=5, **kwargs) if cached
              else GISTEmbedLoss(oracle_student, guide, **kwargs))
    expected = oracle([oracle_student.preprocess(col) for col in texts.values()], None)
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-5)
    got, want = grads(student), grads(oracle_student)
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert 0 < metrics["guide_masked_fraction_anchor_doc"] < 1  # the guide masks some candidates, not all


@pytest.mark.parametrize("margin", [0.0, -0.02])
def test_self_guided_matches_gist_embed_loss_with_the_student_as_its_own_guide(models, margin):
    """guide="self" is GISTEmbedLoss whose guide is the student (no dropout: its no-grad pass equals pass 1).

    A negative margin masks only the candidates scoring above the positive by that much (Qwen3-Embedding's rule).
    """
    student_dir, _ = models
    texts = corpus(N, 1, seed=21)
    student = load_model(student_dir)
    value, metrics = ours(student, None, texts, GuidedInfoNCE(guide="self", temperature=TEMPERATURE, margin=margin))
    assert GuidedInfoNCE(guide="self").guide_model is None  # no second model

    oracle_student = load_model(student_dir)
    oracle = GISTEmbedLoss(oracle_student, oracle_student, temperature=TEMPERATURE, margin=margin)
    expected = oracle([oracle_student.preprocess(col) for col in texts.values()], None)
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-5)
    got, want = grads(student), grads(oracle_student)
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert 0 < metrics["guide_masked_fraction_anchor_doc"] < 1


def test_guide_self_in_a_config_builds_the_self_guided_loss(tmp_path):
    from ds_contrastive.run.config import load_train_config
    from ds_contrastive.run.setup import build_loss

    (tmp_path / "run.yaml").write_text("guide: self\nmargin: -0.1\nmatryoshka_dims: [32, 16]\n")
    loss = build_loss(load_train_config(tmp_path / "run.yaml", {}))
    assert loss.loss.self_guided and loss.loss.margin == -0.1 and loss.guide_model is None
    assert build_loss(load_train_config(None, {"guide": "self"})).self_guided
