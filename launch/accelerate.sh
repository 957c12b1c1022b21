#!/usr/bin/env bash
# One node under `accelerate launch` (it only starts the ranks; ds_contrastive reads the DeepSpeed
# config itself, so accelerate's own DeepSpeed plugin stays off), paths read from where you run it:
#   NUM_GPUS=8 launch/accelerate.sh --config my_run.yaml
set -euo pipefail
# --multi_gpu starts the ranks through torch.distributed (on a CPU-only machine too); without it accelerate
# would start one process.
exec accelerate launch --multi_gpu --num_processes "${NUM_GPUS:-8}" --num_machines 1 --mixed_precision no \
  --dynamo_backend no --main_process_port "${MASTER_PORT:-29500}" -m ds_contrastive.train \
  --deepspeed_config "${DS_CONFIG:-zero2}" "$@"
