#!/usr/bin/env bash
# One node under torchrun (no DeepSpeed launcher; the engine still runs DeepSpeed), paths read from
# where you run it:
#   NUM_GPUS=8 launch/torchrun.sh --config my_run.yaml
# Several nodes: run it on every node with NNODES, NODE_RANK and MASTER_ADDR set (rendezvous on
# MASTER_ADDR:MASTER_PORT), or use launch/slurm.sbatch.
set -euo pipefail
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NUM_GPUS:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" -m ds_contrastive.train \
  --deepspeed_config "${DS_CONFIG:-zero2}" "$@"
