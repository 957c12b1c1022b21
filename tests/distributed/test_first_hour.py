"""A new user's first commands, 2 ranks under the deepspeed launcher, run from their own folder.

A mistake prints one ``error:`` line (no traceback, not once per rank) and exits with its documented code;
``--debug`` shows the traceback. A package installed without the checkout (a wheel, not editable) trains
with ``deepspeed --module ds_contrastive.train`` and the shipped configs named.
"""

import json
import os
import subprocess
import sys

import pytest

from ds_contrastive.core.runtime import free_port
from jobs import ROOT, job_env, wait_or_kill

QD = [{"q": f"what does function {i} do", "d": f"Function {i} returns the number {i}."} for i in range(16)]


def launch(args: list[str], cwd, python: str = sys.executable, env: dict | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "ds_contrastive.train", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = wait_or_kill(proc, cmd, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The user's folder: their data (columns q and d) and a finished run's output_dir."""
    here = tmp_path_factory.mktemp("user")
    (here / "qd.jsonl").write_text("".join(json.dumps(row) + "\n" for row in QD))
    finished = here / "outputs" / "quickstart"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps({"steps": 16, "model_files": []}))
    (finished / "metrics.jsonl").write_text('{"step": 16}\n')
    return here


@pytest.mark.parametrize("args,code,message", [
    (["--config", "nope.yaml"], 2, "error: training config nope.yaml does not exist (relative paths are read from "),
    (["--config", "quickstart", "--train_data", "qd.jsonl", "--output_dir", "new"], 3,
     "error: qd.jsonl line 1: no column(s) ['anchor', 'positive'] (columns: ['q', 'd']); name yours with "),
    (["--config", "quickstart"], 4, "error: outputs/quickstart holds a finished run of 16 steps"),
], ids=["missing_config", "missing_columns", "finished_run_in_output_dir"])
def test_a_mistake_is_one_line_once_with_its_exit_code(folder, args, code, message):
    result = launch(args, folder)
    assert result.returncode == code, result.stdout[-3000:]
    assert result.stdout.count(message) == 1, result.stdout[-3000:]
    assert "Traceback" not in result.stdout and result.stdout.count("error: ") == 1, result.stdout[-3000:]
    if code == 3:
        assert "--anchor_column q --positive_column d" in result.stdout
    if code == 4:
        assert "pass --overwrite_output_dir true to replace it" in result.stdout


def test_debug_shows_the_traceback(folder):
    result = launch(["--config", "nope.yaml", "--debug"], folder)
    assert result.returncode == 1 and "Traceback" in result.stdout and "ConfigError: training config nope.yaml" \
        in result.stdout, result.stdout[-3000:]


def test_a_package_installed_without_the_checkout_trains(tmp_path, tiny_model_dir):
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, timeout=300, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))], check=True,
                   timeout=300, capture_output=True)
    user = tmp_path / "elsewhere"
    user.mkdir()
    env = {**job_env(), "PYTHONPATH": str(ROOT / "tests" / "support")}  # not the checkout
    where = subprocess.run([python, "-c", "import ds_contrastive; print(ds_contrastive.__file__)"], cwd=user, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)) and ".egg-link" not in where, where
    os.symlink(tiny_model_dir, user / "model")
    result = launch(["--deepspeed_config", "zero0", "--config", "quickstart", "--model", "model", "--max_steps", "2",
                     "--global_batch_size", "8", "--chunk_rows", "4", "--eval_data", "none", "--progress_bar", "false",
                     "--output_dir", "out"], user, python=python, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    summary = json.loads((user / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and "model.safetensors" in summary["model_files"]
