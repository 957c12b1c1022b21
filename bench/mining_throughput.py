"""Mining throughput on this machine: ``ds-contrastive mine`` on 1 and 2 ranks, and sentence-transformers' miner.

    python bench/mining_throughput.py --out bench/results/mining-$(date +%F).json

The packaged all-MiniLM-L6-v2 on the built-in stdlib pairs (the quickstart's
1,255 training pairs: one-line summaries against docstrings; the corpus is the
positives), ``num_negatives=3, relative_margin=0.05`` (NV-Retriever's
TopK-PercPos 95%). Ours runs as the real command (``deepspeed --module
ds_contrastive.mining``, or one plain process), with the CPU's cores shared
between the ranks (each rank its share: ``OMP_NUM_THREADS`` left unset), and
reports its phases (``--summary``). sentence-transformers'
``mine_hard_negatives`` runs in this process with all the cores, same options,
``batch_size=32`` on both sides. Each contestant runs ``--repeats`` times; the
figures are the medians. The outputs are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"num_negatives": 3, "relative_margin": 0.05}


def run_ours(ranks: int, out: Path) -> dict:
    """The real command on ``ranks`` processes; its --summary plus the wall time of the whole job."""
    from ds_contrastive.core.runtime import free_port

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launcher = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
                 str(free_port()), "--module"] if ranks > 1 else [sys.executable, "-m"])
    summary = out.with_suffix(".summary.json")
    cmd = [*launcher, "ds_contrastive.mining", "--pairs", "builtin:stdlib", "--output", str(out), "--overwrite",
           "--no_progress", "--no_plot", "--summary", str(summary), *(f"--{k}={v}" for k, v in OPTIONS.items())]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {**json.loads(summary.read_text()), "job_seconds": time.perf_counter() - start}


def run_sentence_transformers(out: Path) -> dict:
    """``mine_hard_negatives`` in this process on the same pairs (the model loaded outside the timing)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from ds_contrastive.mining.inputs import read_pairs
    from ds_contrastive.run.setup import load_model

    anchors, positives = read_pairs("builtin:stdlib", "anchor", "positive")
    model = load_model("builtin:all-MiniLM-L6-v2")
    start = time.perf_counter()
    mined = mine_hard_negatives(Dataset.from_dict({"anchor": anchors, "positive": positives}), model,
                                output_format="n-tuple", output_scores=True, batch_size=32, verbose=False, **OPTIONS)
    seconds = time.perf_counter() - start
    mined.to_json(str(out))
    return {"queries": len(set(anchors)), "documents": len(set(positives)), "rows_written": len(mined),
            "seconds": seconds, "end_to_end_queries_per_second": len(set(anchors)) / seconds}


def rows(path: Path) -> list[tuple]:
    return [(r["anchor"], r["positive"], r["negative_1"], r["negative_2"], r["negative_3"])
            for r in map(json.loads, path.read_text().splitlines())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mining_bench_"))
    results: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__},
                     "workload": {"pairs": "builtin:stdlib", "model": "builtin:all-MiniLM-L6-v2", **OPTIONS}}
    for ranks in map(int, args.ranks.split(",")):
        runs = [run_ours(ranks, work / f"ours-{ranks}.jsonl") for _ in range(args.repeats)]
        results[f"ds-contrastive-{ranks}-ranks"] = {**runs[-1], "job_seconds": statistics.median(
            r["job_seconds"] for r in runs), "end_to_end_queries_per_second": statistics.median(
            r["end_to_end_queries_per_second"] for r in runs)}
        print(ranks, json.dumps(results[f"ds-contrastive-{ranks}-ranks"]), flush=True)
    runs = [run_sentence_transformers(work / "st.jsonl") for _ in range(args.repeats)]
    results["sentence-transformers"] = {**runs[-1], "seconds": statistics.median(r["seconds"] for r in runs)}
    print("st", json.dumps(results["sentence-transformers"]), flush=True)
    reference = rows(work / "st.jsonl")
    results["equal_to_sentence_transformers"] = {
        name: rows(work / f"ours-{ranks}.jsonl") == reference for ranks in map(int, args.ranks.split(","))
        for name in [f"{ranks}-ranks"]}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results["equal_to_sentence_transformers"]))


if __name__ == "__main__":
    main()
