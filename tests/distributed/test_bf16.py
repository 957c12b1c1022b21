"""bf16 (DeepSpeed's bf16 section) on 2 ranks, ZeRO 0-3: the step agrees with fp32 within bf16 noise."""


import pytest

from jobs import run_worker


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    return run_worker("bf16", 2, tiny_model_dir, tmp_path_factory.mktemp("bf16"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_step_follows_the_fp32_reference(report, stage):
    r = report[f"zero{stage}"]
    assert r["dtype"] == "torch.bfloat16"
    assert abs(r["loss"] - r["reference_loss"]) / r["reference_loss"] < 2e-2, r
    assert r["update_cosine"] > 0.9, r
