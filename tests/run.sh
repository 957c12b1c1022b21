#!/usr/bin/env bash
# Runs the whole test suite on CPU with real multi-process DeepSpeed jobs (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 WANDB_MODE=offline
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_contrastive/torch_extensions}
# DeepSpeed JIT-builds its shm comm op at the first process group (about a minute); an interrupted
# build leaves a lock file that makes every later run hang silently. Clear locks, build once.
find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null || true
# DeepSpeed's CPU comm op never unlinks its 69 MB-per-rank buffers in RAM-backed /dev/shm; buffers
# left by earlier runs eat the memory later jobs need (tests/support/jobs.py removes each job's own).
rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true
timeout 600 python -c "from ds_contrastive.core.runtime import init_process_group; init_process_group()"
python -m pytest -q -p no:cacheprovider tests "$@"
