"""The quickstart three ways: as shipped, with one mined hard negative per pair, and with self-guided masking.

1. ``ds-contrastive mine`` gives every stdlib training pair one hard negative, chosen by the packaged
   all-MiniLM-L6-v2 with NV-Retriever's positive-aware rule (``--relative_margin 0.05``: the best
   candidate among the top 100 that scores below 95% of the positive's score);
2. the quickstart trains as shipped, on the mined file (``--negative_columns negative_1``), and with
   ``--guide self --margin -0.1`` (Qwen3-Embedding's false-negative mask);
3. the held-out retrieval metrics of each run are printed beside the untrained model's, and written
   to OUTPUT_DIR/comparison.json.

Run it from any folder (paths are yours): ``python launch/quickstart_hard_negatives.py``;
``--ranks`` sets the ranks of every job (default 2), extra arguments go to every training run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent
RUNS = [  # (label, folder, the quickstart's extra arguments); the mined file is the one with negatives
    ("quickstart", "quickstart", []),
    ("mined hard negative", "mined", ["--negative_columns", "negative_1"]),
    ("guide: self, margin -0.1", "self_guided", ["--guide", "self", "--margin", "-0.1"]),
]
METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")


def run(command: list[str], env: dict[str, str]) -> None:
    """Run one job, its output shown as it goes; stop here if it fails."""
    print("$", " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)


def mine(output: Path, ranks: int, env: dict[str, str]) -> None:
    from ds_contrastive.core.runtime import free_port

    run(["deepspeed", "--quiet", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
         "ds_contrastive.mining", "--pairs", "builtin:stdlib", "--output", str(output), "--num_negatives", "1",
         "--relative_margin", "0.05", "--range_max", "100", "--overwrite"], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/quickstart_hard_negatives")
    args, extra = parser.parse_known_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NUM_RANKS": str(args.ranks), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if shutil.which("nvidia-smi") is None:
        env.setdefault("DS_ACCELERATOR", "cpu")
    mined = out / "mined.jsonl"
    mine(mined, args.ranks, env)

    results = {}
    for name, folder, options in RUNS:
        run_dir = out / folder
        data = ["--train_data", str(mined)] if "--negative_columns" in options else []
        run(["bash", str(LAUNCH / "quickstart.sh"), *data, *options, "--output_dir", str(run_dir),
             "--overwrite_output_dir", "true", *extra], env)
        summary = json.loads((run_dir / "summary.json").read_text())
        results.setdefault("untrained", summary["before"])
        results[name] = summary["after"]

    print(f"\nheld-out stdlib pairs ({args.ranks} ranks)\n{'':<28}" + "".join(f"{m:>11}" for m in METRICS))
    for name, metrics in results.items():
        print(f"{name:<28}" + "".join(f"{metrics[m]:>11.4f}" for m in METRICS))
    (out / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
