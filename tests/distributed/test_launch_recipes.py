"""The launch recipes in launch/: each single-node one trains 2 CPU ranks for 2 steps and saves a loadable model,
run from the user's own folder with paths relative to it.

The cluster recipes (several nodes over ssh, SLURM) need a cluster: here they are only parsed, and the
multi-node one must refuse to start without its hostfile and first node.
"""

import json
import subprocess

import pytest
from sentence_transformers import SentenceTransformer

from ds_contrastive.core.runtime import free_port
from jobs import ROOT, job_env, wait_or_kill


def run_recipe(script: str, args: list[str], env: dict[str, str], cwd, timeout: float = 300
               ) -> subprocess.CompletedProcess:
    cmd = ["bash", str(ROOT / "launch" / script), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = wait_or_kill(proc, cmd, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.parametrize("script", ["one_node.sh", "torchrun.sh", "accelerate.sh"])
def test_single_node_recipe_trains(script, tiny_model_dir, tmp_path):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "qd.jsonl").write_text("".join(json.dumps({"q": f"question {i}", "d": f"answer {i}"}) + "\n"
                                                        for i in range(16)))
    result = run_recipe(script, ["--model", "model", "--train_data", "data/qd.jsonl", "--anchor_column", "q",
                                 "--positive_column", "d", "--max_steps", "2", "--global_batch_size", "8",
                                 "--chunk_rows", "4", "--eval_data", "null", "--progress_bar", "false",
                                 "--output_dir", "out"], {**job_env(), "NUM_GPUS": "2", "MASTER_PORT": str(free_port())},
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert SentenceTransformer(str(out), device="cpu").encode(["a text"]).shape == (1, 32)


@pytest.mark.parametrize("script", ["multi_node.sh", "slurm.sbatch"])
def test_cluster_recipe_parses(script):
    subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], check=True)


def test_multi_node_recipe_needs_its_hostfile(tmp_path):
    env = {k: v for k, v in job_env().items() if k not in ("HOSTFILE", "MASTER_ADDR")}
    result = run_recipe("multi_node.sh", [], env, cwd=tmp_path, timeout=30)
    assert result.returncode != 0 and "set HOSTFILE" in result.stdout
    assert not (tmp_path / ".deepspeed_env").exists()  # refused before writing anything
