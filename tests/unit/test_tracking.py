"""The metric layout (sections, reduction over ranks), W&B switched off, and a config error before any work.

The end-to-end runs (``test_train_e2e.py``) check the layout against the
README in a real 2-rank W&B run; these check the parts one by one.
"""

import json
import math
import subprocess
import sys

import pytest

from ds_contrastive.run.tracking import Tracker, sectioned
from jobs import ROOT, job_env

# what ContrastiveEngine.train_step returns on rank 1 of 2 with a guided Matryoshka loss (values made up)
STEP = {"loss": 1.5, "accuracy": 0.25, "masked_duplicates": 2.0, "candidates_per_anchor": 30.0,
        "positive_similarity": 0.6, "hardest_negative_similarity": 0.4, "loss@32": 1.4, "accuracy@32": 0.3,
        "guide_masked_fraction_anchor_doc": 0.1, "guide_masked_similarity_anchor_doc": 0.9,
        "temperature": 0.05, "global_batch_size": 64.0, "samples_per_second": 32.0, "tokens_per_second": 640.0,
        "tokens": 1280.0, "padding_fraction": 0.3, "chunks": 2.0, "kept_chunks": 0.0, "truncated_texts": 1.0,
        "time_prepare": 0.1, "time_pass1": 0.5, "time_guide": 0.2, "time_gather_loss": 0.1, "time_pass2": 1.0,
        "peak_memory_gb": 3.0, "lr": 1e-4, "grad_norm": 2.0, "time_optimizer": 0.1, "time_step": 2.0,
        "skipped": 0.0, "skipped_steps": 0.0, "truncated_texts_total": 5.0}
RANKS = {"time_step": [4.0, 2.0], "time_prepare": [0.3, 0.1], "time_pass1": [1.5, 0.5], "time_guide": [0.2, 0.2],
         "time_gather_loss": [0.1, 0.1], "time_pass2": [1.8, 1.0], "time_optimizer": [0.1, 0.1],
         "peak_memory_gb": [2.5, 3.0]}


def test_per_rank_values_are_reduced_and_every_key_has_its_section():
    out = sectioned(STEP, RANKS)
    assert out["perf/samples_per_second"] == 64 / 4.0  # the slowest rank sets the pace, not this rank's 2 s
    assert out["perf/tokens_per_second"] == 1280 / 4.0
    assert out["perf/time_step"] == 4.0 and out["perf/time_pass1"] == 1.5 and out["perf/time_pass2"] == 1.8
    assert (out["system/peak_memory_gb_min"], out["system/peak_memory_gb_max"]) == (2.5, 3.0)
    assert out["system/peak_memory_gb_max_rank"] == 1
    assert out["negatives/guide_masked_fraction/anchor_doc"] == 0.1
    assert out["negatives/guide_masked_similarity/anchor_doc"] == 0.9
    assert out["negatives/candidates_per_anchor"] == 30 and out["negatives/global_batch_size"] == 64
    assert out["train/loss@32"] == 1.4 and out["train/grad_norm"] == 2.0 and out["train/lr"] == 1e-4
    assert {k.split("/")[0] for k in out} == {"train", "negatives", "perf", "system"}
    # every engine value is logged once, under one section; per-rank and derived ones are replaced
    assert not any(k.endswith(("/tokens", "/peak_memory_gb")) or k.startswith("train/time_") for k in out)
    # samples/s, tokens/s and tokens become the two recomputed rates; peak_memory_gb its min, max and rank
    assert len(out) == len(STEP) - 3 + 2 - 1 + 3


def test_wandb_disabled_still_writes_the_metrics_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    tracker = Tracker(tmp_path, {"train": {"lr": 1e-4}, "versions": {"torch": "x"}}, 0, {"project": "p"})
    for step in (1, 2):
        tracker.log({"train/loss": 1.0 / step}, step, {"dataset": "train"})
    tracker.finish()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 1.0, "dataset": "train"},
                     {"step": 2, "train/loss": 0.5, "dataset": "train"}]
    assert json.loads((tmp_path / "run_config.json").read_text())["versions"] == {"torch": "x"}
    assert not list(tmp_path.glob("wandb/*run-*")) and not (tmp_path / "elsewhere").exists()


def test_other_ranks_log_nothing(tmp_path):
    tracker = Tracker(tmp_path / "out", {}, 1, None)
    tracker.log({"train/loss": math.pi}, 1)
    tracker.finish()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ds_config, message", [
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
    ({"train_batch_size": 48}, "train_batch_size=48, but the training config's global_batch_size=64"),
    ({"zero_optimisation": {"stage": 2}}, "did you mean 'zero_optimization'"),
])
def test_a_bad_deepspeed_config_stops_the_run_before_data_or_model_load(tmp_path, ds_config, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    # a model and data that do not exist: the config error must come first
    run = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--deepspeed_config", str(path),
                          "--model", str(tmp_path / "no-model"), "--train_data", str(tmp_path / "no-data.jsonl"),
                          "--output_dir", str(tmp_path / "out"), "--progress_bar", "false"],
                         capture_output=True, text=True, env=job_env(), timeout=300)
    assert run.returncode != 0
    assert message in run.stderr and str(path) in run.stderr
    assert "no-data" not in run.stderr and "no-model" not in run.stderr
