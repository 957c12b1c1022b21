"""A learnable temperature under ContrastiveTrainer without DeepSpeed, in one process.

Its ``log_scale`` is a parameter of the SentenceTransformer: the optimizer holds it
undecayed, a run resumed from a checkpoint ends with the parameters and the temperature
of the uninterrupted run, and ``save_model`` writes a model without it plus its
temperature in ``ds_contrastive.json``. (The step's equality with the engine's, ZeRO-3
included, is tests/distributed/test_hf_trainer.py's.)
"""

import json
import math

import torch
from datasets import Dataset
from helpers import corpus, load_model
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

import ds_contrastive as dc

STEPS, SAVE_AT = 4, 2


def trainer(model_dir, output_dir, **kwargs):
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=6, max_steps=STEPS, learning_rate=1e-2,
        weight_decay=0.1, lr_scheduler_type="constant", save_strategy="steps", save_steps=SAVE_AT, seed=3,
        logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, **kwargs)
    return dc.ContrastiveTrainer(model=load_model(model_dir), args=args, train_dataset=Dataset.from_dict(corpus(24)),
                                 loss=dc.InfoNCE(temperature=0.05, learnable_temperature=True), chunk_rows=4,
                                 max_length=32, planner="fill")


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_save_and_optimizer(tiny_model_dir, tmp_path):
    straight = trainer(tiny_model_dir, tmp_path / "straight")
    groups = straight.create_optimizer().param_groups
    [group] = [g for g in groups if any(p is straight.model.log_scale for p in g["params"])]
    assert group["weight_decay"] == 0.0  # never decayed, as in the engine
    straight.train()
    logged = [h["temperature"] for h in straight.state.log_history if "temperature" in h]
    assert len(logged) == STEPS and len(set(logged)) == STEPS, logged  # logged every step, and it moves
    assert abs(logged[0] - 0.05) < 1e-7, logged

    resumed = trainer(tiny_model_dir, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{SAVE_AT}"))
    want, got = params(straight.model), params(resumed.model)
    assert abs(float(got["log_scale"]) - math.log(20.0)) > 1e-3  # the temperature was trained
    difference = float(torch.stack([(got[n] - want[n]).norm() for n in want]).norm()
                       / torch.stack([want[n].norm() for n in want]).norm())
    assert difference < 1e-6, difference
    assert torch.equal(got["log_scale"], want["log_scale"]), (got["log_scale"], want["log_scale"])

    straight.save_model(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert not [k for k in loaded.state_dict() if "log_scale" in k]
    info = json.loads((tmp_path / "saved" / "ds_contrastive.json").read_text())
    learned = 1.0 / math.exp(float(want["log_scale"]))
    assert abs(info["temperature"] - learned) < 1e-6 * learned and info["global_step"] == STEPS, info
    texts = ["query 1 alpha river", "a sentence the model never saw"]
    straight.model.eval()
    assert torch.allclose(loaded.encode(texts, convert_to_tensor=True),
                          straight.model.encode(texts, convert_to_tensor=True), atol=1e-6)
