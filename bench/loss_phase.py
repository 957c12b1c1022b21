"""The loss phase at large global batches against three tiled matrix products, in the same process (issue 20).

For each global batch size N (anchor, positive; query->document only, no
hard negatives, as the step's default), embeddings of ``--dim`` (32: the tiny
encoder of issue 20; unit vectors, positives near their anchors) are handed to
``InfoNCE().compute`` (the whole loss stage of one rank holding every row:
duplicate pairs, logits, masks, log-sum-exp, metrics, gradients) and to the
reference: per tile of rows, ``logits = scale * q @ docs.T``, ``softmax``,
``grad_q = P @ docs`` and ``grad_docs += P.T @ q`` (three products and a
softmax, no masks or metrics), with the same tile height. Each is timed
``--repeats`` times alternately; the medians and their ratio are reported.

Peak memory: each size runs in a fresh process and reports its peak resident
set above what it held once the embeddings existed (the loss phase's own
memory: its tiles, its N x d buffers). Sizes given in ``--memory_only`` are
measured on one rank's share of rows (``--memory_rows``) rather than all N, to
stay in minutes: a tile's memory does not depend on how many tiles run.

    python bench/loss_phase.py --sizes 16384 65536 --memory_only 262144 --out bench/results/loss-phase-$(date +%F).json
    # on a GPU (bench/gpu_run.sh does): 1M rows, bf16 products, the reference's in bf16 too
    python bench/loss_phase.py --device cuda --dim 1024 --precision bf16 --sizes 1048576 --memory_only \
        --repeats 2 --out $OUT/loss-phase-<card>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SCALE = 20.0


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def embeddings(n: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    anchors = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    positives = torch.nn.functional.normalize(anchors + 0.5 * torch.randn(n, dim, generator=g), dim=-1)
    hashes = torch.randint(-2**62, 2**62, (n, 2), generator=g)
    return torch.stack([anchors, positives], dim=1).to(device), hashes.to(device)


def reference(emb: torch.Tensor, tile: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three tiled products and a softmax: the arithmetic the loss cannot avoid (bf16: the products' inputs)."""
    low = torch.bfloat16 if precision == "bf16" else emb.dtype
    q, docs = emb[:, 0].to(low), emb[:, 1].to(low)
    n = len(q)
    grad_q, grad_docs = torch.empty_like(q), torch.zeros_like(docs)
    for start in range(0, n, tile):
        rows = q[start:start + tile]
        p = torch.softmax(SCALE * (rows @ docs.T).float(), dim=1).to(low)
        grad_q[start:start + tile] = p @ docs
        grad_docs += p.T @ rows
    return grad_q, grad_docs


def one_size(n: int, dim: int, precision: str, repeats: int, rows: int | None, device: torch.device) -> dict:
    from ds_contrastive import InfoNCE

    loss = InfoNCE(temperature=1 / SCALE, precision=precision)
    emb, hashes = embeddings(n, dim, device)
    base = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else rss_gb()
    rows = rows or n
    result = loss.compute(emb, hashes, 0, rows, SCALE)  # also the warm-up
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_gb()
    out = {"rows": n, "dim": dim, "precision": precision, "loss_rows_computed": rows,
           "peak_memory_above_embeddings_gb": peak - base, "embeddings_gb": emb.numel() * 4 / 2**30,
           "loss": result.sums["loss"] / rows}
    if rows < n:
        return out
    from ds_contrastive.losses.blockwise import tiling

    tile = tiling(n, None, loss.tile_elements)[0]
    times: dict[str, list[float]] = {"loss_phase": [], "three_products": []}
    for _ in range(repeats):
        for name, run in (("loss_phase", lambda: loss.compute(emb, hashes, 0, n, SCALE)),
                          ("three_products", lambda: reference(emb, tile, precision))):
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {**out, "tile_rows": tile, "seconds": times, "median_seconds": medians,
            "ratio": medians["loss_phase"] / medians["three_products"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[16384, 65536])
    parser.add_argument("--memory_only", type=int, nargs="*", default=[262144])
    parser.add_argument("--memory_rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=32, help="embedding size (32: the tiny encoder of issue 20)")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                        help="InfoNCE(precision=...); bf16 also for the reference's products")
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_size(args.one, args.dim, args.precision, args.repeats, args.rows,
                                  torch.device(args.device))))
        return
    runs = []
    for n, rows in [(n, None) for n in args.sizes] + [(n, args.memory_rows) for n in args.memory_only]:
        cmd = [sys.executable, __file__, "--one", str(n), "--repeats", str(args.repeats), "--threads",
               str(args.threads), "--device", args.device, "--dim", str(args.dim), "--precision", args.precision,
               "--out", args.out] + (["--rows", str(rows)] if rows else [])
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    card = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    report = {"bench": "loss_phase", "date": time.strftime("%F"), "device": args.device, "threads": args.threads,
              "machine": card, "torch": torch.__version__, "scale": SCALE, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
