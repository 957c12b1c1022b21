"""ContrastiveTrainer (sentence-transformers' Trainer) takes the same step as the core engine.

Two ranks, fp32, dropout on, SGD with gradient clipping 0, a 12-row global
batch with a duplicate positive across ranks, several chunks per rank, the first
chunks' pass-1 graphs kept for pass 2 (under DDP as many as it may: all but
the last): one optimizer step through the Trainer against the core engine's step on the same
shards and the single-process full-batch reference. Under the deepspeed
launcher with ZeRO 0, 1, 2 and 3, under ``accelerate launch --use_deepspeed`` (ZeRO-2), under torchrun with DDP (no DeepSpeed), and in one plain process.
Then ``trainer.save_model()`` and ``SentenceTransformer(path)`` embed like the
in-memory model (ZeRO-3: consolidated weights, not each rank's slice).
The ZeRO-3 run turns on the Trainer's own ``gradient_checkpointing``: its step
still equals the engine's and the reference's, which run without it.
The ZeRO-3, DDP and one-process runs learn the temperature: its update (a parameter
of the SentenceTransformer under the Trainer, of the engine's module under the engine)
is compared too, the saved model holds no ``log_scale`` and its ``ds_contrastive.json``
records the learned temperature.
"""

import json
import math

import pytest

from jobs import run_worker

CASES = {"zero0": ("deepspeed", 0), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3),
         "ddp": ("torchrun", -1), "accelerate_zero2": ("accelerate", 2), "one_process": ("python", -1)}
LEARNABLE_TEMPERATURE = ("zero3", "ddp", "one_process")
RETAIN_TOKENS = 250
ACCELERATE_DS_CONFIG = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                        "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_step_equals_engine_and_reference(case, tiny_model_dir, tmp_path):
    launcher, stage = CASES[case]
    retain = 10**6 if launcher == "torchrun" else RETAIN_TOKENS
    extra, launcher_args = ["--stage", str(stage), "--retain_tokens", str(retain)], []
    if case == "zero3":
        extra.append("--checkpointing")
    if case in LEARNABLE_TEMPERATURE:
        extra.append("--learnable_temperature")
    if launcher == "accelerate":  # DeepSpeed set up by `accelerate launch --use_deepspeed`, not by the arguments
        (tmp_path / "ds.json").write_text(json.dumps(ACCELERATE_DS_CONFIG))
        extra.append("--ds_from_launcher")
        launcher_args = ["--use_deepspeed", "--deepspeed_config_file", str(tmp_path / "ds.json")]
    ranks = 1 if launcher == "python" else 2
    r = run_worker("hf_trainer", ranks, tiny_model_dir, tmp_path, extra, timeout=600, launcher=launcher,
                   launcher_args=launcher_args)
    expected = "DeepSpeedBackend" if stage >= 0 else "TorchBackend(DDP)" if ranks > 1 else "TorchBackend"
    assert r["backend"] == expected, r
    assert r["checkpointing"] == (case == "zero3"), r
    assert r["rows_per_rank"] == [6] * ranks and r["distinct_rows"] == 6 * ranks, r  # the dataset was one batch
    assert r["chunks_per_rank"] > 1, r
    if expected == "TorchBackend(DDP)":  # DDP arms its reduction at forward time: the last chunk is re-run
        assert r["kept_chunks"] == r["chunks_per_rank"] - 1, r
    else:  # kept backwards back to back, then re-run chunks
        assert 2 <= r["kept_chunks"] < r["chunks_per_rank"], r
    if expected == "TorchBackend(DDP)":  # one reduction, in the last chunk's backward; none before
        calls = r["ddp_reductions_per_chunk"]
        assert len(calls) == r["chunks_per_rank"] and calls[-1] > 0 and not any(calls[:-1]), calls
    assert r["trained"] > 1e-3, r  # the step moved the weights
    assert r["trainer_vs_engine"] < 1e-5, r
    assert r["trainer_vs_reference"] < 1e-5, r
    assert r["trainer_update_vs_reference"] < 1e-4, r  # a 1/W or Wx gradient fails this
    assert abs(r["loss"]["trainer"] - r["loss"]["reference"]) < 1e-5, r
    assert abs(r["grad_norm"]["trainer"] - r["grad_norm"]["reference"]) < 1e-4 * r["grad_norm"]["reference"], r
    assert r["saved_vs_in_memory"] < 1e-5, r
    assert r["saved_log_scale_keys"] == [], r
    if case in LEARNABLE_TEMPERATURE:
        scale = r["log_scale"]
        assert abs(scale["trainer"] - scale["initial"]) > 1e-4, r  # the temperature moved
        assert scale["trainer_update_vs_engine"] < 1e-5, r
        assert scale["trainer_update_vs_reference"] < 1e-4, r
        learned = 1.0 / math.exp(scale["trainer"])
        assert abs(r["saved_info"]["temperature"] - learned) < 1e-6 * learned, r
    else:
        assert r["log_scale"] is None and r["saved_info"]["temperature"] == 0.05, r
    for key in ("loss", "accuracy", "temperature", "grad_norm", "learning_rate", "samples_per_second",
                "tokens_per_second", "padding_fraction", "time_pass1", "time_pass2", "global_batch_size"):
        assert key in r["logged_keys"], (key, r["logged_keys"])
