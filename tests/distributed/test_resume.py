"""Faults in real multi-process runs of ``launch/train.py``: a killed rank, a kill during a save, a hung rank.

Every run is 2 CPU ranks, fp32, ZeRO-2, a tiny BERT with dropout and a
learnable temperature, 10 steps of global batch 8 drawn from two datasets
(32 and 24 rows, different columns, one with prefixes: the run crosses
epochs of both), a checkpoint every 3 steps, W&B offline. The reference is
the same run left alone: a resumed run must end with bit-identical parameters
and must have trained on the same sequence of global batches (the dataset
and batch digest each step logs identify every rank's texts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import corpus
from safetensors.torch import load_file
from test_train_e2e import write_jsonl
from wandb_offline import history, records

from jobs import LAUNCHERS, ROOT, job_env, run_deepspeed, wait_or_kill

STEPS, EVERY = 10, 3


SECRETS = {"WANDB_API_KEY": "wandb-secret-3f9c1e7a5b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e", "HF_TOKEN": "hf_secretTokenA1B2C3"}


def datasets(root: Path) -> str:
    write_jsonl(root / "a.jsonl", corpus(32, 1, seed=11))
    b = corpus(24, 0, seed=12)
    write_jsonl(root / "b.jsonl", {"q": b["anchor"], "d": b["positive"]})
    write_jsonl(root / "heldout.jsonl", corpus(10, 0, seed=13))
    return json.dumps([{"path": str(root / "a.jsonl"), "weight": 1.0},
                       {"path": str(root / "b.jsonl"), "weight": 1.5, "anchor_column": "q", "positive_column": "d",
                        "negative_columns": [], "query_prefix": "query: ", "document_prefix": "passage: "}])


def train_args(data: str, model: Path, out: Path, *extra: str) -> list[str]:
    """The reference run's arguments; with datasets, the held-out pairs beside them are evaluated every 4 steps."""
    sources = json.loads(data)
    evaluation = (["--eval_data", str(Path(sources[0]["path"]).with_name("heldout.jsonl")), "--eval_every_steps", "4",
                   "--best_metric", "mrr@10"] if sources else ["--eval_data", "null"])
    return ["--model", str(model), "--datasets", data, "--negative_columns", "negative_0", *evaluation,
            "--global_batch_size", "8", "--max_steps", str(STEPS), "--chunk_rows", "4",
            "--learnable_temperature", "true", "--precision", "fp32", "--wandb", "true", "--progress_bar", "false",
            "--checkpoint_every_steps", str(EVERY), "--output_dir", str(out), *extra]


def start(script: Path, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    cmd = [*LAUNCHERS["deepspeed"](2), str(script), *args]
    proc = subprocess.Popen(cmd, env=env or job_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, cmd


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank}")


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if line.endswith("}")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.communicate()[0][-6000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def steps_seen(out: Path) -> list[tuple[int, str, str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["dataset"], r["batch_digest"], r["train/loss"]) for r in rows if "train/loss" in r]


def evaluations(out: Path) -> list[dict]:
    """The eval records of the run's metrics file, and its best model's eval.json."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/mrr@10" in r] + [json.loads((out / "best/eval.json").read_text())]


def assert_same_model(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    different = [k for k in x if not (x[k] == y[k]).all()]
    assert not different, f"parameters differ from the uninterrupted run: {different}"
    assert json.loads((a / "ds_contrastive.json").read_text()) == json.loads((b / "ds_contrastive.json").read_text())


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = datasets(root)
    reference = root / "reference"
    log = run_deepspeed(ROOT / "launch/train.py", 2, train_args(data, tiny_model_dir, reference), timeout=600,
                        env={**job_env(), **SECRETS}).stdout
    return data, tiny_model_dir, reference, log


def test_reference_run_keeps_the_newest_checkpoints(setup):
    _, _, reference, _ = setup
    checkpoints = reference / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000006", "step-00000009"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000009"
    seen = steps_seen(reference)
    assert [s for s, *_ in seen] == list(range(1, STEPS + 1))
    assert {d for _, d, *_ in seen} == {"a", "b"}
    state = json.loads((checkpoints / "step-00000009/state.json").read_text())["run"]
    used = state["data_position"]
    assert used["a"]["batches_used"] + used["b"]["batches_used"] == 9
    assert used["a"]["batches_used"] == sum(1 for _, d, *_ in seen[:9] if d == "a")


def test_no_secret_reaches_logs_or_saved_files(setup):
    _, _, reference, log = setup
    for secret in SECRETS.values():
        assert secret not in log
        for path in reference.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"{secret[:10]}... found in {path}"


def test_sigkill_one_rank_then_resume_gives_the_uninterrupted_run(setup):
    data, model, reference, _ = setup
    out = reference.parent / "killed"
    args = train_args(data, model, out)
    proc, cmd = start(ROOT / "launch/train.py", args)
    wait_for_step(out / "metrics.jsonl", 7, proc)
    killed_at = time.monotonic()
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    log = wait_or_kill(proc, cmd, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60, "the surviving rank did not stop promptly"
    assert not (out / "model.safetensors").exists(), f"the killed run finished anyway:\n{log[-3000:]}"
    assert (out / "checkpoints/latest").read_text().strip() == "step-00000006"

    resumed = run_deepspeed(ROOT / "launch/train.py", 2, [*args, "--resume", "auto"], timeout=600).stdout
    assert "resumed from" in resumed and "at step 6 of 10" in resumed
    assert_same_model(reference, out)
    assert steps_seen(out) == steps_seen(reference)  # same batches (digests), same losses, each step once
    # the best evaluation so far (step 4) came back with the checkpoint: the same best model is kept
    assert evaluations(out) == evaluations(reference)
    assert [e["step"] for e in evaluations(reference)[:-1]] == [0, 4, 8, 10]
    assert_same_model(reference / "best", out / "best")
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, "not the same W&B run"
    logged = [row["_step"] for row in history(next(runs[1].glob("run-*.wandb"))) if "train/loss" in row]
    assert logged == list(range(7, STEPS + 1))
    assert any(r.WhichOneof("record_type") == "run" for r in records(next(runs[1].glob("run-*.wandb"))))


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(setup):
    data, model, reference, _ = setup
    out = reference.parent / "killed_in_save"
    args = train_args(data, model, out)
    env = {**job_env(), "KILL_DURING_SAVE_OF": "step-00000006"}
    proc, cmd = start(ROOT / "tests/distributed/kill_during_save_worker.py", args, env)
    log = wait_or_kill(proc, cmd, timeout=300)
    assert proc.returncode != 0, log[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "step-00000006.partial").is_dir(), log[-3000:]  # DeepSpeed's files were written
    assert not (checkpoints / "step-00000006").exists()
    assert (checkpoints / "latest").read_text().strip() == "step-00000003"

    resumed = run_deepspeed(ROOT / "launch/train.py", 2, [*args, "--resume", "auto"], timeout=600).stdout
    assert "at step 3 of 10" in resumed
    assert_same_model(reference, out)
    assert steps_seen(out) == steps_seen(reference)
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000006", "step-00000009"]


def test_a_fresh_run_refuses_to_overwrite_checkpoints(setup):
    data, model, reference, _ = setup
    with pytest.raises(AssertionError, match=r"holds a finished run of 10 steps \(.*checkpoints.*\): pass "
                                             r"--overwrite_output_dir true to replace it"):
        run_deepspeed(ROOT / "launch/train.py", 2, train_args(data, model, reference), timeout=300)
    assert (reference / "checkpoints/step-00000009").is_dir()


def test_resuming_a_different_run_is_refused(setup):
    data, model, reference, _ = setup
    other = reference.parent / "other"
    other.mkdir()
    for path in (reference / "checkpoints").iterdir():
        if path.is_dir():
            (other / "checkpoints" / path.name).mkdir(parents=True)
            for f in path.iterdir():
                (other / "checkpoints" / path.name / f.name).symlink_to(f)
    args = train_args(data, model, other, "--resume", "auto", "--global_batch_size", "12")
    with pytest.raises(AssertionError, match="the run differs .*global_batch_size: saved 8, now 12"):
        run_deepspeed(ROOT / "launch/train.py", 2, args, timeout=300)


def test_a_hung_rank_stops_the_others_within_the_timeout(setup):
    data, model, reference, _ = setup
    out = reference.parent / "hung"
    proc, cmd = start(ROOT / "launch/train.py", train_args(data, model, out, "--max_steps", "40",
                                                            "--collective_timeout_seconds", "10"))
    try:
        wait_for_step(out / "metrics.jsonl", 2, proc)
        hung = rank_pid(proc, 1)
        os.kill(hung, signal.SIGSTOP)
        stopped_at = time.monotonic()
        log = wait_or_kill(proc, cmd, timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 6, log[-4000:]  # RankFailure's exit code, printed as one error line
    assert "error: rank 0: a collective with the other ranks failed" in log, log[-4000:]
    assert "collective_timeout_seconds=10" in log and "Traceback" not in log, log[-4000:]
    assert "--resume auto" in log
    assert time.monotonic() - stopped_at < 120


def test_a_streamed_run_resumes_exactly_from_a_checkpoint(tiny_model_dir, tmp_path):
    """Streaming: the stream position and the bad-row count come back; resumed here from an explicit path.

    ``max_length`` 12 cuts many of the texts: the truncation count is logged and its total resumes too.
    """
    rows = corpus(40, 1, seed=13)
    write_jsonl(tmp_path / "train.jsonl", rows)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    for i in (4, 17, 30):
        lines[i] = '{"anchor": "cut off'  # malformed: skipped and counted by the rank that owns it
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    common = ["--train_data", str(tmp_path / "train.jsonl"), "--streaming", "true", "--stream_window_batches", "2",
              "--max_bad_rows", "10", "--max_length", "12"]
    full = tmp_path / "full"
    run_deepspeed(ROOT / "launch/train.py", 2, [*train_args("[]", tiny_model_dir, full), *common], timeout=600)
    resumed = tmp_path / "resumed"
    log = run_deepspeed(ROOT / "launch/train.py", 2, [*train_args("[]", tiny_model_dir, resumed), *common, "--resume",
                                                      str(full / "checkpoints/step-00000006")], timeout=600).stdout
    assert "at step 6 of 10" in log
    assert_same_model(full, resumed)
    assert steps_seen(resumed) == steps_seen(full)[6:]
    keys = ("train/bad_rows_skipped", "train/truncated_texts", "train/truncated_texts_total")
    logged = [[json.loads(line)[k] for k in keys] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1][0] >= 1
    assert all(truncated > 0 for _, truncated, _ in logged)
    assert logged[-1][2] == sum(truncated for _, truncated, _ in logged)
    again = [[json.loads(line)[k] for k in keys] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert again == logged[6:]
