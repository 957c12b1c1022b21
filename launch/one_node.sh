#!/usr/bin/env bash
# One node, NUM_GPUS ranks under the DeepSpeed launcher. Extra arguments go to launch/train.py:
#   NUM_GPUS=8 launch/one_node.sh --config my_run.yaml --global_batch_size 65536
# DS_CONFIG picks the DeepSpeed config (default ZeRO-2). On a CPU-only machine NUM_GPUS is the number
# of CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" launch/train.py \
  --deepspeed_config "${DS_CONFIG:-configs/deepspeed/zero2.json}" "$@"
