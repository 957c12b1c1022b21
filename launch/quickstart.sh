#!/usr/bin/env bash
# The quickstart on built-in defaults: 2 CPU ranks (or NUM_RANKS) under the deepspeed launcher,
# offline, the packaged all-MiniLM-L6-v2 fine-tuned on Python-standard-library docstring pairs.
# Paths are read from where you run it: the model goes to ./outputs/quickstart. Extra arguments
# override the config: bash launch/quickstart.sh --max_steps 40 --output_dir outputs/qs40
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# no GPU: say so, rather than have DeepSpeed warn on every rank that it found none
command -v nvidia-smi > /dev/null || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
port=$(python -c "from ds_contrastive.core.runtime import free_port; print(free_port())")
exec deepspeed --quiet --num_gpus "${NUM_RANKS:-2}" --master_port "$port" --module ds_contrastive.train \
  --deepspeed_config zero2 --config quickstart "$@"
