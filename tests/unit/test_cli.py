"""``ds-contrastive env``: the versions and settings a bug report needs, never a secret."""

import json
import subprocess
import sys
from importlib import metadata

import torch

from jobs import ROOT, job_env

SECRET = "zz-do-not-print-4711"


def env_command(*args: str) -> str:
    env = {**job_env(), "NCCL_DEBUG": "INFO", "WANDB_API_KEY": SECRET, "NCCL_SECRET": SECRET}
    return subprocess.run([sys.executable, "-m", "ds_contrastive", "env", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=120).stdout


def test_env_prints_versions_gpus_and_settings_without_secrets():
    out = env_command()
    for name in ("torch", "deepspeed", "transformers", "sentence-transformers"):
        assert f"{name:<22} {metadata.version(name)}" in out
    assert f"CUDA available: {torch.cuda.is_available()}" in out
    assert f"GPUs: {torch.cuda.device_count()}" in out
    assert "  NCCL_DEBUG=INFO" in out
    assert SECRET not in out


def test_env_as_json():
    info = json.loads(env_command("--json"))
    assert info["packages"]["deepspeed"] == metadata.version("deepspeed")
    assert len(info["accelerator"]["GPUs"]) == torch.cuda.device_count()
    assert info["variables"]["NCCL_DEBUG"] == "INFO"
    assert SECRET not in json.dumps(info)
