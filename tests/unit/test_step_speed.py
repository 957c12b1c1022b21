"""The step's speed features change nothing but speed: kept pass-1 graphs, prepared batches, vectorized padding.

In one process (no process group), on a tiny random-init BERT with dropout on:
the gradient of a step that keeps some or all pass-1 graphs (by a token
budget or by ``retain_tokens="auto"``'s measured memory), or that is fed a
batch prepared in the prefetch thread, equals the gradient of the plain
re-running step on the raw batch.
"""

import threading
import time

import pytest
import torch
from helpers import corpus, load_model

from ds_contrastive import InfoNCE, prefetched
from ds_contrastive.core.backends import TorchBackend
from ds_contrastive.core.chunks import ChunkCosts
from ds_contrastive.core.shard import Tokenized, tokenizer_settings
from ds_contrastive.core.step import BACKWARD_SHARE, CachedStep, chunk_shapes, kept_within, parameter_bytes

CHUNK_TOKENS = 120
COSTS = ChunkCosts(call=1e-3, token=1e-6, attention=1e-8)  # fixed: every step below plans alike


def gradient(model_dir, batch, retain_tokens: int | str = 0, prepare_in_thread: bool = False, **options):
    torch.manual_seed(0)
    model = load_model(model_dir)
    model.train()
    length, lowercase = tokenizer_settings(model, 64)
    step = CachedStep(InfoNCE(temperature=0.05), model.tokenizer, max_length=length, lowercase=lowercase,
                      chunk_tokens=CHUNK_TOKENS, seed=3, retain_tokens=retain_tokens, chunk_costs=COSTS, **options)
    backend = TorchBackend(model, torch.device("cpu"))
    if prepare_in_thread:
        step.calibrate(backend)  # what the engine does when it is built
    fed = next(prefetched(step.prepare, [batch])) if prepare_in_thread else batch
    out = step.forward_backward(fed, backend, step=0)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out, step


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("retain_tokens,kept", [(250, "some"), (10**6, "all")])
def test_kept_graphs_give_the_same_gradient(tiny_model_dir, retain_tokens, kept):
    batch = corpus(16, negatives=1, seed=5)
    plain, out, _ = gradient(tiny_model_dir, batch)
    grads, kept_out, _ = gradient(tiny_model_dir, batch, retain_tokens=retain_tokens)
    assert out.kept_chunks == 0 and len(out.plan) > 2
    if kept == "some":  # kept backwards back to back, then re-run chunks
        assert 2 <= kept_out.kept_chunks < len(out.plan)
    else:
        assert kept_out.kept_chunks == len(out.plan)
    assert max_difference(plain, grads) == 0.0
    assert kept_out.metrics["loss"] == out.metrics["loss"]


@pytest.mark.parametrize("gigabytes,kept", [(None, "all"), (0.0, "none"), ("two chunks", "two")])
def test_auto_keeps_what_fits_the_memory_budget(tiny_model_dir, gigabytes, kept):
    batch = corpus(16, negatives=1, seed=5)
    plain, out, step = gradient(tiny_model_dir, batch)
    if gigabytes == "two chunks":  # budget: pass 2's peak when the first two chunks' graphs are kept
        _, _, step = gradient(tiny_model_dir, batch, retain_tokens="auto")
        memory = [step.calibration.graph_bytes(r, n) for r, n in chunk_shapes(out.plan, step.prepare(batch).tokens)]
        needed = max(memory[0] + memory[1] + BACKWARD_SHARE * memory[0], (1 + BACKWARD_SHARE) * max(memory[2:]))
        assert memory[0] + memory[1] + memory[2] > needed * 1.0001  # keeping a third chunk does not fit
        assert kept_within(memory, needed * 1.0001) == 2 and kept_within(memory, needed * 0.9999) < 2
        gigabytes = (needed * 1.0001 + parameter_bytes(load_model(tiny_model_dir))) / 2**30
    grads, auto, _ = gradient(tiny_model_dir, batch, retain_tokens="auto", retain_memory_gb=gigabytes)
    assert len(out.plan) > 2
    assert auto.kept_chunks == {"all": len(out.plan), "none": 0, "two": 2}[kept]
    assert max_difference(plain, grads) == 0.0


def test_prepared_in_a_thread_gives_the_same_gradient(tiny_model_dir):
    batch = corpus(16, negatives=1, seed=6)
    plain, _, _ = gradient(tiny_model_dir, batch)
    grads, _, _ = gradient(tiny_model_dir, batch, prepare_in_thread=True)
    assert max_difference(plain, grads) == 0.0


def test_a_batch_prepared_under_other_settings_is_refused(tiny_model_dir):
    model = load_model(tiny_model_dir)

    def make(chunk_tokens: int) -> CachedStep:
        return CachedStep(InfoNCE(), model.tokenizer, max_length=64, chunk_tokens=chunk_tokens, chunk_costs=COSTS,
                          retain_tokens=0)

    prepared = make(120).prepare(corpus(4, seed=1))
    with pytest.raises(ValueError, match="prepared by another step"):
        make(200).forward_backward(prepared, TorchBackend(model, torch.device("cpu")), step=0)


def test_a_measured_planner_must_be_calibrated_before_prepare(tiny_model_dir):
    model = load_model(tiny_model_dir)
    step = CachedStep(InfoNCE(), model.tokenizer, max_length=64, chunk_tokens=120)
    with pytest.raises(RuntimeError, match="call calibrate"):
        step.prepare(corpus(4, seed=1))


def test_negative_retain_tokens_is_refused(tiny_model_dir):
    model = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="retain_tokens must be 'auto' or an integer >= 0"):
        CachedStep(InfoNCE(), model.tokenizer, max_length=64, chunk_tokens=100, retain_tokens=-1)


def test_padding_matches_a_per_row_loop():
    ids = [[101, 7, 8, 102], [101, 102], [101, 5, 6, 9, 4, 102], [101, 3, 102]]
    types = [[0] * len(x) for x in ids]
    tokens = Tokenized(ids, types, pad_id=0)
    order = [2, 0, 3]
    got = tokens.features(order, torch.device("cpu"))
    width = max(len(ids[i]) for i in order)
    want_ids = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in order])
    want_mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in order])
    assert torch.equal(got["input_ids"], want_ids)
    assert torch.equal(got["attention_mask"], want_mask)
    assert torch.equal(got["token_type_ids"], torch.zeros_like(want_ids))
    assert tokens.lengths == [4, 2, 6, 3] and len(tokens) == 4


def test_prefetched_runs_ahead_in_order_in_another_thread():
    started, threads = [], set()
    release = threading.Event()

    def work(x: int) -> int:
        started.append(x)
        threads.add(threading.current_thread().name)
        if x >= 2:
            release.wait(timeout=10)
        return x * x

    results = prefetched(work, range(6), depth=2)
    assert next(results) == 0
    deadline = time.monotonic() + 10
    while len(started) < 3 and time.monotonic() < deadline:  # items 1 and 2 are computed without being asked for
        time.sleep(0.01)
    assert started == [0, 1, 2]
    release.set()
    assert list(results) == [1, 4, 9, 16, 25]
    assert started == list(range(6))
    assert threading.current_thread().name not in threads


def test_closing_prefetched_stops_the_work():
    calls = []
    results = prefetched(lambda x: calls.append(x) or x, range(100), depth=1)
    assert next(results) == 0
    results.close()
    settled = len(calls)
    time.sleep(0.2)
    assert len(calls) == settled <= 2  # the one call in flight at most, nothing after


def test_prefetched_raises_where_the_failure_is():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    results = prefetched(str, items())
    assert [next(results), next(results)] == ["1", "2"]
    with pytest.raises(OSError, match="disk gone"):
        next(results)

    def fail_on_two(x: int) -> int:
        if x == 2:
            raise ValueError("bad item 2")
        return x

    results = prefetched(fail_on_two, range(5))
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="bad item 2"):
        next(results)
    with pytest.raises(ValueError, match="depth"):
        next(prefetched(str, [1], depth=0))


def test_a_batch_prepared_elsewhere_is_replanned_with_this_steps_costs(tiny_model_dir):
    model = load_model(tiny_model_dir)
    batch = corpus(12, negatives=1, seed=4)

    def make(**options) -> CachedStep:
        return CachedStep(InfoNCE(), model.tokenizer, max_length=64, chunk_tokens=120, retain_tokens=0, **options)

    elsewhere = make(planner="fill").prepare(batch)  # e.g. a data process, before any calibration
    here = make(chunk_costs=COSTS)
    replanned = here.replan(elsewhere)
    direct = here.prepare(batch)
    assert replanned.plan.chunks == direct.plan.chunks and replanned.settings == direct.settings
    assert replanned.tokens is elsewhere.tokens
    out = here.forward_backward(replanned, TorchBackend(model, torch.device("cpu")), step=0)
    assert out.plan.chunks == direct.plan.chunks
    with pytest.raises(ValueError, match="this step's tokenizer"):
        CachedStep(InfoNCE(), model.tokenizer, max_length=32, chunk_tokens=120, chunk_costs=COSTS).replan(elsewhere)
