#!/usr/bin/env bash
# One node, NUM_GPUS ranks under the DeepSpeed launcher. Extra arguments go to the training script
# (launch/train.py's options), paths read from where you run it:
#   NUM_GPUS=8 launch/one_node.sh --config my_run.yaml --global_batch_size 65536
# DS_CONFIG picks the DeepSpeed config: a file or a shipped name (default zero2). On a CPU-only
# machine NUM_GPUS is the number of CPU ranks.
set -euo pipefail
exec deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" --module ds_contrastive.train \
  --deepspeed_config "${DS_CONFIG:-zero2}" "$@"
