"""``launch/train_hf.py`` end to end: sentence-transformers' Trainer with ``--deepspeed``, 2 ranks, W&B offline.

A ZeRO-3 run on two datasets (``--datasets``: different columns, one with a
hard-negative column and one with a query prefix, drawn by weight), with the guided
loss (the guide is loaded after the ZeRO-3 TrainingArguments exist and must stay
whole), Matryoshka sizes, a learnable temperature, an evaluator, checkpoints and ``save_model``; the
step metrics are read back from the offline W&B run file. A second launch resumes
from the checkpoint and finishes the run like an uninterrupted one, temperature included.
"""

import json
import math

import pytest
from helpers import corpus, minilm_dir
from sentence_transformers import SentenceTransformer
from wandb_offline import history, run_file

from jobs import ROOT, job_env, run_deepspeed

STEP_KEYS = ["loss", "accuracy", "temperature", "learning_rate", "grad_norm", "samples_per_second",
             "tokens_per_second", "padding_fraction", "time_pass1", "time_guide", "time_gather_loss", "time_pass2",
             "time_optimizer", "peak_memory_gb", "global_batch_size", "chunks", "loss@16", "loss@32",
             "guide_masked_fraction_anchor_doc", "guide_masked_fraction_anchor_anchor"]


def write_jsonl(path, columns):
    with open(path, "w") as f:
        f.writelines(json.dumps(dict(zip(columns, row))) + "\n" for row in zip(*columns.values()))


def DATASETS(root):
    return [{"path": str(root / "train.jsonl"), "name": "pairs", "negative_columns": ["negative_0"], "weight": 2},
            {"path": str(root / "qa.jsonl"), "anchor_column": "question", "positive_column": "answer",
             "query_prefix": "query: ", "weight": 1}]


def train_hf(root, model_dir, output, steps, wandb_dir, extra=()):
    env = {**job_env(), "WANDB_DIR": str(wandb_dir), "WANDB_PROJECT": "ds-contrastive-tests"}
    run_deepspeed(ROOT / "launch/train_hf.py", 2, [
        "--deepspeed", str(ROOT / "configs/deepspeed/hf_zero3.json"), "--model", str(model_dir),
        "--datasets", json.dumps(DATASETS(root)),
        "--eval_data", str(root / "heldout.jsonl"), "--guide", str(minilm_dir()), "--margin", "0.02",
        "--learnable_temperature",
        "--matryoshka_dims", "32", "16", "--matryoshka_weights", "1", "0.5", "--chunk_tokens", "150",
        "--max_length", "32", "--per_device_train_batch_size", "6", "--max_steps", str(steps),
        "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
        "--report_to", "wandb", "--run_name", "train-hf", "--disable_tqdm", "true", "--seed", "3",
        "--output_dir", str(output), *extra], timeout=600, env=env)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_hf")
    write_jsonl(root / "train.jsonl", corpus(48, 1, seed=21))
    qa = corpus(24, 0, seed=23)
    write_jsonl(root / "qa.jsonl", {"question": qa["anchor"], "answer": qa["positive"]})
    write_jsonl(root / "heldout.jsonl", corpus(12, 0, seed=22))
    train_hf(root, tiny_model_dir, root / "out", 3, root / "wandb")
    return root


def test_wandb_run_has_step_metrics(run):
    rows = [row for row in history(run_file(run / "wandb")) if "train/loss" in row]
    assert len(rows) == 3
    for row in rows:
        for key in STEP_KEYS:
            assert math.isfinite(row[f"train/{key}"]), (key, row)
        assert row["train/global_batch_size"] == 12
        assert 0 <= row["train/guide_masked_fraction_anchor_doc"] <= 1
    assert [row["train/global_step"] for row in rows] == [1, 2, 3]
    for row in rows:  # each step's own dataset's loss and accuracy (named by --datasets; the file's stem "qa")
        own = [name for name in ("pairs", "qa") if f"train/{name}/loss" in row]
        assert len(own) == 1 and row[f"train/{own[0]}/loss"] == pytest.approx(row["train/loss"], abs=1e-3), row
        assert 0 <= row[f"train/{own[0]}/accuracy"] <= 1
    assert any("eval/heldout_cosine_mrr@10" in row for row in history(run_file(run / "wandb")))


def test_saved_model_and_checkpoint(run):
    out = run / "out"
    model = SentenceTransformer(str(out), device="cpu")
    assert model.encode(["it loads"]).shape == (1, 32)
    assert not [k for k in model.state_dict() if "log_scale" in k]  # the temperature is not part of the model
    temperatures = [row["train/temperature"] for row in history(run_file(run / "wandb")) if "train/loss" in row]
    # logged every step (sentence-transformers rounds step metrics to 4 decimals: lr 1e-4 moves it less)
    assert temperatures == pytest.approx([0.05] * 3, abs=1e-4), temperatures
    info = json.loads((out / "ds_contrastive.json").read_text())
    assert info["global_step"] == 3 and info["temperature"] != pytest.approx(0.05, abs=1e-6), info
    assert (out / "checkpoint-2").is_dir()
    # a checkpoint's model is a whole model too (ZeRO-3 consolidated), beside DeepSpeed's own state
    SentenceTransformer(str(out / "checkpoint-2"), device="cpu").encode(["it loads"])
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_resume_from_checkpoint_equals_uninterrupted_run(run, tiny_model_dir):
    train_hf(run, tiny_model_dir, run / "resumed", 4, run / "wandb-resumed",
             ["--resume_from_checkpoint", str(run / "out" / "checkpoint-2")])
    rows = [row for row in history(run_file(run / "wandb-resumed")) if "train/loss" in row]
    assert [row["train/global_step"] for row in rows] == [3, 4]  # steps 1-2 came from the checkpoint
    train_hf(run, tiny_model_dir, run / "straight", 4, run / "wandb-straight")
    texts = ["query 1 alpha river", "doc 7 storm window table", "a sentence the model never saw"]
    resumed, straight = (SentenceTransformer(str(run / d), device="cpu").encode(texts, convert_to_tensor=True)
                         for d in ("resumed", "straight"))
    # same batches, same dropout seeds (from the step number), optimizer state restored
    assert float((resumed - straight).norm() / straight.norm()) < 1e-5
    learned = [json.loads((run / d / "ds_contrastive.json").read_text())["temperature"]
               for d in ("resumed", "straight")]
    assert abs(learned[0] - learned[1]) < 1e-6 * learned[1], learned  # the temperature resumed from the checkpoint
