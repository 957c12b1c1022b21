"""The planner's constants: measured by a probe on this machine, cached, reused, and used by the step.

In one process on a tiny random-init BERT. Timings themselves are not
asserted (a shared CPU is noisy); what is: the fit recovers known constants,
the memory model predicts what a forward saves for backward, a second
calibration reads the cache instead of probing, another wrapper probes
again, and the step plans with the calibrated costs.
"""

import json

import pytest
import torch
from helpers import corpus, load_model

from ds_contrastive import InfoNCE
from ds_contrastive.core.backends import TorchBackend
from ds_contrastive.core.calibration import Probe, calibrate, fit_nonnegative, read_cache
from ds_contrastive.core.chunks import ChunkCosts, plan_fastest
from ds_contrastive.core.step import CachedStep


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    monkeypatch.setenv("DS_CONTRASTIVE_CACHE", str(path))
    return path


def make_step(model, **options) -> CachedStep:
    return CachedStep(InfoNCE(), model.tokenizer, max_length=64, chunk_tokens=400, **options)


def test_fit_recovers_known_constants_and_stays_nonnegative():
    shapes = [(r, n) for n in (8, 32, 128) for r in (1, 16, 64)]
    truth = (2e-3, 3e-6, 4e-9)
    times = [truth[0] + truth[1] * r * n + truth[2] * r * n * n for r, n in shapes]
    fitted = fit_nonnegative([[1.0, r * n, r * n * n] for r, n in shapes], times, relative=True)
    assert fitted == pytest.approx(truth, rel=1e-6)
    # data a negative attention term would fit better: clamped to 0, the rest refitted
    times = [1e-3 + 1e-6 * r * n - 1e-10 * r * n * n for r, n in shapes]
    assert min(fit_nonnegative([[1.0, r * n, r * n * n] for r, n in shapes], times, relative=True)) >= 0


def test_memory_model_predicts_what_a_training_forward_saves(tiny_model_dir, cache):
    model = load_model(tiny_model_dir)
    model.eval()  # as a freshly loaded model is: the probe measures in training mode all the same
    step = make_step(model)
    backend = TorchBackend(model, torch.device("cpu"))
    step.calibrate(backend)
    assert not model.training  # the caller's mode is restored
    model.train()  # dropout saves its masks too
    probe = Probe(backend, model.tokenizer("a short text")["input_ids"], 0, True)
    for rows, length in [(3, 50), (20, 12)]:  # shapes the probe did not use
        assert step.calibration.graph_bytes(rows, length) == pytest.approx(probe.saved_bytes(rows, length), rel=0.1)


def test_the_probe_runs_once_then_the_cache_serves(tiny_model_dir, cache, monkeypatch):
    model = load_model(tiny_model_dir)
    model.train()
    backend = TorchBackend(model, torch.device("cpu"))
    measured = []
    original = Probe.measure
    monkeypatch.setattr(Probe, "measure", lambda self, *a: measured.append(a) or original(self, *a))
    rng_before = torch.random.get_rng_state()
    first = make_step(model)
    first.calibrate(backend)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the probe's dropout draws left no trace
    assert len(measured) == 1 and cache.exists()
    costs = first.chunk_costs
    assert costs == first.calibration.costs and costs.call + costs.token > 0

    second_model = load_model(tiny_model_dir)  # another run of the same model: read, not measured
    second = make_step(second_model)
    second.calibrate(TorchBackend(second_model, torch.device("cpu")))
    assert len(measured) == 1 and second.chunk_costs == costs
    entry = json.loads(cache.read_text())
    assert len(entry) == 1 and ChunkCosts(**{k: v for k, v in next(iter(entry.values())).items()
                                             if k in ("call", "token", "attention")}) == costs

    # the step plans with those costs
    batch = corpus(12, negatives=1, seed=2)
    prepared = second.prepare(batch)
    assert prepared.plan.chunks == plan_fastest(prepared.tokens.lengths, costs, 400, None).chunks
    out = second.forward_backward(prepared, TorchBackend(second_model, torch.device("cpu")), step=0)
    assert out.plan.chunks == prepared.plan.chunks

    # fixed costs are kept as given; another wrapper or model shape is measured again
    fixed = ChunkCosts(call=1.0, token=0.0, attention=0.0)
    third = make_step(model, chunk_costs=fixed, retain_tokens=0)
    third.calibrate(backend)
    assert third.chunk_costs == fixed and len(measured) == 1
    backend.wrapper = "ddp"
    calibrate(backend, [101, 2000, 102], 64, 400, None, 0, True)
    assert len(measured) == 2 and len(json.loads(cache.read_text())) == 2


def test_an_unreadable_cache_is_measured_again(tiny_model_dir, cache):
    cache.write_text("{not json")
    assert read_cache("anything") is None
    model = load_model(tiny_model_dir)
    step = make_step(model)
    step.calibrate(TorchBackend(model, torch.device("cpu")))
    assert step.chunk_costs is not None and read_cache(next(iter(json.loads(cache.read_text())))) is not None
