#!/usr/bin/env bash
# Runs the whole test suite on CPU with real multi-process DeepSpeed jobs (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 WANDB_MODE=offline
python -m pytest -q -p no:cacheprovider tests "$@"
