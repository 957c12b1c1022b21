#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher, run once on the first node (it starts the others over
# ssh/pdsh):
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 launch/multi_node.sh --config my_run.yaml
# DeepSpeed forwards to the other nodes only the variables listed in .deepspeed_env (one VAR=value per
# line, in the directory it is started from, or $HOME). Without one, this script writes the set ones of
# those that usually matter; an existing .deepspeed_env is used as it is. Paths are read from where you
# run it, on every node (a shared filesystem, the same working directory).
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE (see launch/hostfile.example)}" "${MASTER_ADDR:?set MASTER_ADDR to the first node}"
if [[ ! -e .deepspeed_env ]]; then
  for var in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_DEBUG HF_HOME HF_HUB_OFFLINE WANDB_MODE \
             WANDB_PROJECT TORCH_EXTENSIONS_DIR OMP_NUM_THREADS; do
    if [[ -n "${!var:-}" ]]; then echo "$var=${!var}"; fi
  done > .deepspeed_env
fi
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module ds_contrastive.train --deepspeed_config "${DS_CONFIG:-zero3}" "$@"
