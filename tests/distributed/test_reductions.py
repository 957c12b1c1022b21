"""Exactly one gradient reduction per optimizer step, and equal forward calls on every rank.

2 ranks with unequal shards, ZeRO 0-3, one chunk and seven chunks per pass, with the default kept graphs.
Every reducing collective DeepSpeed issues is counted and attributed to the
backward call (or optimizer step) it ran in.
"""


import pytest

from jobs import run_worker


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    return run_worker("reductions", 2, tiny_model_dir, tmp_path_factory.mktemp("reductions"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_gradient_reduction_per_step(report, stage):
    single, chunked = report[f"zero{stage}/rows1000"], report[f"zero{stage}/rows3"]
    assert single["chunks"] == 1 and chunked["chunks"] > 1
    for r in (single, chunked):
        assert r["backward_calls"] == r["chunks"]
        gradient = [e for e in r["events"] if e[2] > 1]  # scalar all-reduces are grad-norm bookkeeping
        assert len(gradient) == 1, r["events"]
        last = f"backward{r['chunks'] - 1}"
        assert gradient[0][0] in (last, "between"), r["events"]  # in the last backward or the coalesced flush
        early = [e for e in r["events"] if e[0].startswith("backward") and e[0] != last]
        assert early == [], early
    # chunking changes nothing about what is reduced
    assert [e[1:] for e in single["events"]] == [e[1:] for e in chunked["events"]]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_equal_forward_calls_on_every_rank(report, stage):
    for rows in (1000, 3):
        r = report[f"zero{stage}/rows{rows}"]
        calls = r["forward_calls_per_rank"]
        # pass 1 + pass 2, less the pass-2 forwards of the chunks whose graph was kept (retain_tokens="auto")
        assert calls[0] == calls[1] == 2 * r["chunks"] - r["kept_chunks"]
