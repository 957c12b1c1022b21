"""``launch/train.py`` end to end: 2 ranks under the deepspeed launcher, W&B offline, a few steps.

The test reads the logged metrics back from the offline run file and loads the
saved model with ``SentenceTransformer(path)``; ZeRO-2, ZeRO-3 and ZeRO-3 with
CPU offload runs of the same job must save the same model (ZeRO-3 saves
consolidated weights).
"""

import json
import math

import pytest
import torch
from sentence_transformers import SentenceTransformer

from helpers import corpus, minilm_dir
from launch import ROOT, run_deepspeed
from wandb_offline import config, history, run_file

STEPS = 3
CONFIGS = {"zero2": [], "zero3": [], "zero3_offload": [],
           "zero3_guided_matryoshka": ["--guide", str(minilm_dir()), "--matryoshka_dims", "32,16",
                                       "--matryoshka_weights", "1,0.5", "--margin", "0.02"]}
STEP_KEYS = ["loss", "accuracy", "temperature", "lr", "grad_norm", "samples_per_second", "tokens_per_second",
             "time_pass1", "time_gather_loss", "time_pass2", "time_optimizer", "peak_memory_gb", "masked_duplicates",
             "global_batch_size"]


def write_jsonl(path, columns):
    with open(path, "w") as f:
        for row in zip(*columns.values()):
            f.write(json.dumps(dict(zip(columns, row))) + "\n")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_jsonl(root / "train.jsonl", corpus(40, 1, seed=11))
    write_jsonl(root / "heldout.jsonl", corpus(12, 0, seed=12))
    out = {}
    for stage, extra in CONFIGS.items():
        out[stage] = root / stage
        run_deepspeed(ROOT / "launch/train.py", 2, [
            "--deepspeed_config", str(ROOT / f"configs/deepspeed/{stage.split('_guided')[0]}.json"), *extra,
            "--config", str(ROOT / "configs/train/quickstart.yaml"),
            "--model", str(tiny_model_dir), "--train_data", str(root / "train.jsonl"),
            "--negative_columns", "negative_0", "--eval_data", str(root / "heldout.jsonl"),
            "--global_batch_size", "9", "--max_steps", str(STEPS), "--chunk_tokens", "150",
            "--max_length", "32", "--learnable_temperature", "true", "--wandb", "true",
            "--wandb_run_name", f"e2e-{stage}", "--progress_bar", "false", "--output_dir", str(out[stage]),
        ], timeout=600)
    return out


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_wandb_offline_run_has_step_metrics(runs, stage):
    path = run_file(runs[stage])
    steps = [row for row in history(path) if "train/loss" in row]
    assert [row["_step"] for row in steps] == list(range(1, STEPS + 1))
    for row in steps:
        for key in STEP_KEYS:
            assert math.isfinite(row[f"train/{key}"]), (key, row)
        assert row["train/global_batch_size"] == 9
    assert any("eval/recall@1" in row for row in history(path))
    logged = config(path)
    assert logged["train"]["global_batch_size"] == 9
    assert logged["deepspeed"]["zero_optimization"]["stage"] == int(stage[-1])
    lines = (runs[stage] / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if "train/loss" in line]) == STEPS


def test_guided_matryoshka_run_logs_its_metrics(runs):
    steps = [row for row in history(run_file(runs["zero3_guided_matryoshka"])) if "train/loss" in row]
    assert len(steps) == STEPS
    for row in steps:
        for key in ("loss@16", "loss@32", "accuracy@16", "guide_masked_fraction_anchor_doc",
                    "guide_masked_fraction_anchor_anchor", "guide_masked_fraction_positive_positive",
                    "guide_masked_similarity_anchor_doc", "time_guide"):
            assert math.isfinite(row[f"train/{key}"]), (key, row)
        assert 0 <= row["train/guide_masked_fraction_anchor_doc"] <= 1
    SentenceTransformer(str(runs["zero3_guided_matryoshka"]), device="cpu").encode(["loads"])


def test_saved_models_load_and_agree_across_zero_stages(runs, tiny_model_dir):
    texts = ["query 1 alpha river", "doc 7 storm window table", "a sentence the model never saw"]
    initial = SentenceTransformer(str(tiny_model_dir), device="cpu").encode(texts, convert_to_tensor=True)
    saved = {s: SentenceTransformer(str(runs[s]), device="cpu").encode(texts, convert_to_tensor=True) for s in runs}
    assert not torch.allclose(saved["zero2"], initial, atol=1e-4)  # it trained
    for other in ("zero3", "zero3_offload"):
        err = float((saved[other] - saved["zero2"]).norm() / saved["zero2"].norm())
        assert err < 1e-5, (other, err)  # ZeRO-3 (offload too) saved the consolidated weights of the same update
    info = json.loads((runs["zero3"] / "ds_contrastive.json").read_text())
    assert info["global_step"] == STEPS and 0 < info["temperature"] < 1
    summary = json.loads((runs["zero3"] / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) >= {"recall@1", "mrr@10"}
