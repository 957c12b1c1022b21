"""Checkpoints in one process: exact resume under every ZeRO stage, the atomic layout, safe loading.

Multi-process kills and resumes of ``launch/train.py`` are in test_resume.py.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import corpus, load_model, minilm_dir
from transformers import AutoTokenizer, BertTokenizer

import ds_contrastive as dc
from ds_contrastive.core.shard import tokenize
from ds_contrastive.run import checkpoint
from ds_contrastive.run.config import redacted


def engine(model_dir: Path, stage: int, **options) -> dc.ContrastiveEngine:
    return dc.ContrastiveEngine(
        load_model(model_dir), dc.InfoNCE(learnable_temperature=True), chunk_rows=4, lr=1e-3,
        ds_config={"zero_optimization": {"stage": stage}, "gradient_clipping": 1.0},
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)), **options)


def local_params(e: dc.ContrastiveEngine) -> list[torch.Tensor]:
    """This rank's parameter values (ZeRO-3: its partitions)."""
    return [getattr(p, "ds_tensor", p).detach().clone() for p in e.module.parameters()]


BATCHES = [{k: v[i * 8:(i + 1) * 8] for k, v in corpus(32, 1, seed=5).items()} for i in range(4)]


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_resumed_engine_ends_where_the_uninterrupted_one_does(tiny_model_dir, tmp_path, stage):
    first = engine(tiny_model_dir, stage)
    for i, batch in enumerate(BATCHES):
        first.train_step(batch)
        if i == 1:
            saved = first.save_checkpoint(tmp_path, {"data": "mine"}, {"rank_thing": 7}, keep=1)
            after_save = torch.rand(3)  # the RNG stream at the checkpoint
    second = engine(tiny_model_dir, stage)
    state, mine = second.load_checkpoint(saved)
    assert (state, mine) == ({"data": "mine"}, {"rank_thing": 7})
    assert second.global_step == 2
    assert torch.equal(torch.rand(3), after_save)
    lr_at_2 = second.engine.get_lr()[0]
    for batch in BATCHES[2:]:
        second.train_step(batch)
    assert lr_at_2 == pytest.approx(1e-3 / 3)
    assert all(torch.equal(a, b) for a, b in zip(local_params(first), local_params(second)))
    assert first.temperature() == second.temperature() != 0.05  # the learnable temperature moved and was restored


def test_a_resumed_engine_plans_with_the_costs_its_run_planned_with(tiny_model_dir, tmp_path):
    """The plan sets the dropout seeds: a resume on a machine that measures other costs plans as before."""
    first = engine(tiny_model_dir, 0)
    first.train_step(BATCHES[0])
    saved = first.save_checkpoint(tmp_path, keep=1)
    elsewhere = dc.ChunkCosts(call=1.0, token=0.0, attention=0.0)
    second = engine(tiny_model_dir, 0, chunk_costs=elsewhere)
    second.load_checkpoint(saved)
    assert second.step.chunk_costs == first.step.chunk_costs != elsewhere
    assert second.prepare(BATCHES[1]).plan.chunks == first.prepare(BATCHES[1]).plan.chunks
    # a checkpoint of an earlier version (fill-to-budget plans, no costs) is refused, naming the way out
    state = json.loads((saved / checkpoint.STATE_FILE).read_text())
    del state["engine"]["chunk_costs"]
    (saved / checkpoint.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="planner='fill'"):
        engine(tiny_model_dir, 0).load_checkpoint(saved)
    engine(tiny_model_dir, 0, planner="fill").load_checkpoint(saved)


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / (checkpoint.checkpoint_name(step) + ("" if complete else checkpoint.PARTIAL))
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"format": checkpoint.FORMAT, "step": step}))
    return path


def test_unfinished_saves_are_never_resumed_from(tmp_path):
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 9, complete=False)  # killed mid-save
    (tmp_path / "step-00000012").mkdir()  # renamed but without its state file: not ours, not complete
    (tmp_path / "latest").write_text("step-00000003\n")
    assert checkpoint.newest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(checkpoint.CheckpointError, match="unfinished save"):
        checkpoint.read_state(tmp_path / "step-00000009.partial")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.read_state(tmp_path / "step-00000012")


def test_a_checkpoint_committed_just_before_a_kill_is_the_newest(tmp_path):
    """Killed between the directory rename and the ``latest`` update: the renamed one is complete and newest."""
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 6)
    (tmp_path / "latest").write_text("step-00000003\n")
    assert checkpoint.newest_checkpoint(tmp_path).name == "step-00000006"


def test_saves_keep_the_newest_and_clear_killed_saves(tiny_model_dir, tmp_path):
    e = engine(tiny_model_dir, 2)
    fake_checkpoint(tmp_path, 7, complete=False)  # a killed save of a step this run never saves again
    for batch in BATCHES[:3]:
        e.train_step(batch)
        e.save_checkpoint(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]  # no .partial left
    assert (tmp_path / "latest").read_text() == "step-00000003\n"
    assert checkpoint.read_state(tmp_path / "step-00000003")["step"] == 3


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_files_are_loaded_weights_only(tiny_model_dir, tmp_path):
    e = engine(tiny_model_dir, 2)
    e.train_step(BATCHES[0])
    saved = e.save_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    (saved / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": Payload(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        engine(tiny_model_dir, 2).load_checkpoint(saved)
    assert not marker.exists()


def test_loading_what_is_not_a_checkpoint_names_it(tiny_model_dir, tmp_path):
    e = engine(tiny_model_dir, 2)
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        e.load_checkpoint(tmp_path)


def test_a_checkpoint_of_another_world_size_is_refused(tiny_model_dir, tmp_path):
    e = engine(tiny_model_dir, 2)
    e.train_step(BATCHES[0])
    saved = e.save_checkpoint(tmp_path)
    state = json.loads((saved / checkpoint.STATE_FILE).read_text())
    (saved / checkpoint.STATE_FILE).write_text(json.dumps({**state, "world_size": 4}))
    with pytest.raises(checkpoint.CheckpointError, match="saved by 4 ranks; this run has 1"):
        engine(tiny_model_dir, 2).load_checkpoint(saved)


def test_schedule_by_steps_and_minutes():
    by_steps = checkpoint.Schedule(3, None, torch.device("cpu"))
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    by_time = checkpoint.Schedule(None, 1e-9, torch.device("cpu"))
    assert all(by_time.due(s) for s in range(1, 4))
    not_yet = checkpoint.Schedule(None, 60, torch.device("cpu"))
    assert not any(not_yet.due(s) for s in range(1, 4))


@pytest.mark.parametrize("fast", [True, False])
def test_truncated_texts_are_counted(fast, tmp_path):
    path = minilm_dir()
    if fast:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        shutil.copy(path / "vocab.txt", tmp_path / "vocab.txt")
        tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    # [CLS] + 8 words + [SEP] = 10 tokens: exactly the length, not truncated
    texts = ["short", " ".join(["word"] * 8), " ".join(["word"] * 9), " ".join(["word"] * 500)]
    tokens = tokenize(tokenizer, texts, max_length=10)
    assert tokens.lengths == [3, 10, 10, 10]
    assert tokens.truncated == 2


def test_secrets_are_redacted_from_saved_configs():
    config = {"wandb_project": "p", "retain_tokens": 5, "chunk_tokens": 8,
              "monitor": {"comet": {"api_key": "sk-123", "enabled": True}}, "hub_token": "hf_abc",
              "nested": [{"password": "pw"}], "empty_token": None, "aws_secret_access_key": "AKIA",
              "secret_key": "s", "private_key": "k"}
    out = redacted(config)
    assert out["monitor"]["comet"] == {"api_key": "<redacted>", "enabled": True}
    assert out["hub_token"] == "<redacted>" and out["nested"] == [{"password": "<redacted>"}]
    assert out["aws_secret_access_key"] == out["secret_key"] == out["private_key"] == "<redacted>"
    assert out["retain_tokens"] == 5 and out["chunk_tokens"] == 8 and out["empty_token"] is None
    assert redacted({"chunk_costs": {"token": 1e-4}}) == {"chunk_costs": {"token": 1e-4}}  # a number is no secret
    assert config["hub_token"] == "hf_abc"  # the caller's copy is untouched


def test_deepspeed_loads_are_weights_only_inside_the_block_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "code-ran"
    path = tmp_path / "payload.pt"
    path.write_bytes(pickle.dumps(Payload(marker)))
    original = TorchCheckpointEngine.load
    with checkpoint.weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TorchCheckpointEngine().load(str(path))
    assert not marker.exists()
    assert TorchCheckpointEngine.load is original


def test_the_trainers_train_runs_inside_weights_only_loads(monkeypatch):
    """ContrastiveTrainer.train (its resume_from_checkpoint and best-model loads) runs inside weights_only_loads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from sentence_transformers import SentenceTransformerTrainer

    original = TorchCheckpointEngine.load
    seen = []
    monkeypatch.setattr(SentenceTransformerTrainer, "train",
                        lambda self, *a, **k: seen.append(TorchCheckpointEngine.load is not original) or "done")
    trainer = dc.ContrastiveTrainer.__new__(dc.ContrastiveTrainer)  # train() needs no other state here
    assert trainer.train(resume_from_checkpoint="somewhere") == "done"
    assert seen == [True]
    assert TorchCheckpointEngine.load is original
