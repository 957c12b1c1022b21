"""Guided and Matryoshka losses through the whole engine step, against the full-batch reference.

Guided: 2 and 3 ranks (unequal shards), ZeRO 0 and 3, fp32, dropout on,
contrast_anchors and contrast_positives on, absolute and relative margins
(the relative one with a learnable temperature); the guide is the packaged
all-MiniLM-L6-v2 and must stay unpartitioned under ZeRO-3. Self-guided: the
same launches, the student's own pass-1 embeddings as the guide (the
reference masks with its own forward's embeddings, detached), with GIST's
margin 0 and a negative margin that masks only candidates above the positive. Matryoshka: 2
ranks, ZeRO 2, sizes (32, 16, 8) with weights, and the encoder runs as often as
without Matryoshka.
"""

import pytest

from jobs import run_worker

TOLERANCE = 1e-5
UPDATE_TOLERANCE = 1e-4


@pytest.mark.parametrize("world_size", [2, 3])
def test_guided_step_equals_full_batch_reference(world_size, tiny_model_dir, tmp_path):
    report = run_worker("exactness", world_size, tiny_model_dir, tmp_path, [
        "--stages", "0,3", "--budgets", "several,one_per_chunk",
        "--losses", "guided,guided_relative_learnable,self_guided,self_guided_above", "--steps", "2"], timeout=900)
    assert len(report) == 2 * 2 * 4
    for key, steps in report.items():
        for step in steps.values():
            assert step["param_rel"] < TOLERANCE, (key, step)
            assert step["update_rel"] < UPDATE_TOLERANCE and step["grad_norm_rel"] < UPDATE_TOLERANCE, (key, step)
            if "/self_guided" in key:  # no guide model at all
                assert step["guide_unpartitioned"] is None, (key, step)
            else:
                assert step["guide_unpartitioned"] == [True] * world_size, (key, step)
    for prefix in ("zero0/several", "zero3/one_per_chunk"):  # both masks mask, the one above the positive less
        gist, above = (report[f"{prefix}/{loss}"]["step1"]["masked_fraction"] for loss in ("self_guided",
                                                                                           "self_guided_above"))
        assert 0 < above < gist, (prefix, gist, above)


def test_matryoshka_step_equals_reference_without_extra_forwards(tiny_model_dir, tmp_path):
    report = run_worker("exactness", 2, tiny_model_dir, tmp_path, [
        "--stages", "2", "--budgets", "several", "--losses", "matryoshka,qd_fixed,matryoshka_self_guided",
        "--steps", "2"])
    for loss in ("matryoshka", "matryoshka_self_guided"):  # self-guided: masks from the full-size embeddings
        for step in report[f"zero2/several/{loss}"].values():
            assert step["param_rel"] < TOLERANCE and step["update_rel"] < UPDATE_TOLERANCE, (loss, step)
    plain = report["zero2/several/qd_fixed"]["step1"]["forward_calls_per_rank"]
    assert report["zero2/several/matryoshka"]["step1"]["forward_calls_per_rank"] == plain
