"""ContrastiveTrainer (sentence-transformers' Trainer) takes the same step as the core engine.

Two ranks, fp32, dropout on, SGD with gradient clipping 0, a 12-row global
batch with a duplicate positive across ranks, several chunks per rank: one
optimizer step through the Trainer against the core engine's step on the same
shards and the single-process full-batch reference. Under the deepspeed
launcher with ZeRO 0, 1, 2 and 3, and under torchrun with DDP (no DeepSpeed).
Then ``trainer.save_model()`` and ``SentenceTransformer(path)`` embed like the
in-memory model (ZeRO-3: consolidated weights, not each rank's slice).
"""

import pytest

from launch import run_worker

CASES = {"zero0": ("deepspeed", 0), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3),
         "ddp": ("torchrun", -1)}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_step_equals_engine_and_reference(case, tiny_model_dir, tmp_path):
    launcher, stage = CASES[case]
    r = run_worker("hf_trainer", 2, tiny_model_dir, tmp_path, ["--stage", str(stage)], timeout=600,
                   launcher=launcher)
    assert r["rows_per_rank"] == [6, 6] and r["distinct_rows"] == 12, r  # the whole dataset was one global batch
    assert r["chunks_per_rank"] > 1, r
    assert r["trained"] > 1e-3, r  # the step moved the weights
    assert r["trainer_vs_engine"] < 1e-5, r
    assert r["trainer_vs_reference"] < 1e-5, r
    assert r["trainer_update_vs_reference"] < 1e-4, r  # a 1/W or Wx gradient fails this
    assert abs(r["loss"]["trainer"] - r["loss"]["reference"]) < 1e-5, r
    assert abs(r["grad_norm"]["trainer"] - r["grad_norm"]["reference"]) < 1e-4 * r["grad_norm"]["reference"], r
    assert r["saved_vs_in_memory"] < 1e-5, r
    for key in ("loss", "accuracy", "temperature", "grad_norm", "learning_rate", "samples_per_second",
                "tokens_per_second", "padding_fraction", "time_pass1", "time_pass2", "global_batch_size"):
        assert key in r["logged_keys"], (key, r["logged_keys"])
