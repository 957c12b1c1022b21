#!/usr/bin/env bash
# The one command to run on the GPU machine (issue 5): install the carried wheels, run the benchmark.
#
#   bash bench/prepare_gpu_wheels.sh      # once, on the development machine: fills .whl/ (~6 MiB)
#   bash bench/gpu_run.sh                 # on the GPU machine, from the repository root, with .whl/ carried
#
# Writes <card>-<date>.json, <card>-<date>.md (the table), gpu_throughput.log and nvidia-smi.txt into
# $OUT (the device tool's output folder) or, without $OUT, into bench/results/. Extra arguments go to
# bench/gpu_throughput.py (e.g. --items fixed-bert-large-16k, --budget 300). ds_contrastive runs with
# the library's defaults: --planner fastest (chunk cuts from costs a short probe measures when each
# engine is built, cached in ~/.cache/ds_contrastive/calibration.json: on this fresh machine, once per
# model and ZeRO stage) and --retain auto (kept pass-1 graphs sized from the probe's activation bytes
# and half the free GPU memory); --planner fill or --retain N|0 override them. --chunk-tokens N sets
# the memory cap (most padded tokens per forward call). Never run on a GPU yet: only --smoke has run.
# BUDGET_S (default 310, after at most 120 s of the loss-phase measurement) is the throughput run's own
# time budget: it skips what no longer fits and its watchdog exits 35 s after it, so the whole command
# ends in under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"

# DeepSpeed 0.19.8 (+ hjson, pydantic & co.) and this package, built on the development machine;
# --target keeps the image's own packages untouched.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed (run bench/prepare_gpu_wheels.sh first)"; exit 3; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=9.0   # the image's 9.0a breaks DeepSpeed's op builder (no op is built, but it is parsed)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
# The loss phase at 1M rows (issue 20): bf16 products against three bf16 products, at most 120 s, before the
# throughput run (whose budget leaves room for it).
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
timeout 120 python3 bench/loss_phase.py --device cuda --dim 1024 --precision bf16 --sizes 1048576 --memory_only \
    --repeats 2 --threads 16 --out "$OUT/loss-phase-${CARD:-gpu}-$(date +%F).json" 2>&1 | tee "$OUT/loss_phase.log"
python3 bench/gpu_throughput.py --out "$OUT/" --budget "${BUDGET_S:-310}" "$@" 2>&1 | tee "$OUT/gpu_throughput.log"
exit "${PIPESTATUS[0]}"
