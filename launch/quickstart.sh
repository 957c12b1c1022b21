#!/usr/bin/env bash
# The quickstart on built-in defaults: 2 CPU ranks (or NUM_RANKS) under the deepspeed launcher,
# offline, the packaged all-MiniLM-L6-v2 fine-tuned on Python-standard-library docstring pairs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_contrastive/torch_extensions}
find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null || true  # a stale build lock hangs every later run
port=$(python -c "from ds_contrastive.core.runtime import free_port; print(free_port())")
# DeepSpeed's CPU comm op leaves 69 MB per rank in RAM-backed /dev/shm; remove this run's on exit.
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$port"_* 2>/dev/null || true' EXIT
deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$port" launch/train.py \
  --deepspeed_config configs/deepspeed/zero2.json --config configs/train/quickstart.yaml "$@"
