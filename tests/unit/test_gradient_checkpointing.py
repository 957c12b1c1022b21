"""Gradient checkpointing inside a chunk is exact: with dropout on, the step's parameters equal those without it.

Non-reentrant checkpointing replays the RNG state when it recomputes a layer, so the recomputation draws the
masks of the forward it repeats: pass 2's re-run, or a kept pass-1 graph.
"""

import pytest
import torch

import ds_contrastive as dc
from ds_contrastive.errors import ConfigError
from ds_contrastive.run.setup import enable_gradient_checkpointing
from helpers import corpus, load_model, tiny_bert_dir, tiny_decoder_dir


def one_step(model_dir, checkpointing: bool, retain_tokens: int) -> dict[str, torch.Tensor]:
    model = load_model(model_dir)
    if checkpointing:
        enable_gradient_checkpointing(model)
    engine = dc.ContrastiveEngine(model, dc.InfoNCE(), ds_config={"zero_optimization": {"stage": 0}}, chunk_rows=3,
                                  retain_tokens=retain_tokens, lr=1e-2, seed=7)
    metrics = engine.train_step(corpus(10, negatives=1, seed=5))
    assert metrics["chunks"] > 1 and (metrics["kept_chunks"] > 0) == (retain_tokens > 0), metrics
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
@pytest.mark.parametrize("retain_tokens", [0, 10**6], ids=["rerun", "kept"])
def test_checkpointed_step_equals_the_plain_one(arch, retain_tokens, tmp_path):
    model_dir = tiny_decoder_dir(tmp_path, "qwen2") if arch == "qwen2" else tiny_bert_dir(tmp_path)
    plain = one_step(model_dir, False, retain_tokens)
    checkpointed = one_step(model_dir, True, retain_tokens)
    start = {n: p.detach() for n, p in load_model(model_dir).named_parameters()}
    assert any(float((plain[n] - start[n]).abs().max()) > 0 for n in plain)  # the step moved the weights
    diff = max(float((plain[n] - checkpointed[n]).abs().max()) for n in plain)
    assert diff < 1e-6, diff


def test_a_model_without_checkpointing_support_is_refused(tmp_path):
    model = load_model(tiny_bert_dir(tmp_path))
    model[0].auto_model.supports_gradient_checkpointing = False
    with pytest.raises(ConfigError, match="does not support it"):
        enable_gradient_checkpointing(model)
