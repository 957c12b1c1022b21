"""CPU race, in one process: ds_contrastive's ContrastiveEngine against sentence-transformers' CachedMNRL.

    python bench/cpu_vs_st.py --out bench/results/cpu-vs-st-$(date +%F).json

Why: the claim to check is that, on the same model, optimizer and batches, the
engine's step (length-sorted chunks, and whatever chunk planner and retained
pass-1 graphs are its defaults) is faster than the step of sentence-transformers'
trainer with CachedMultipleNegativesRankingLoss (CMNRL), and by how much the
engine's defaults beat its old fixed token budgets. Steps of the contestants
alternate (round-robin, one step each in turn), so that a slow spell of the
shared CPU falls on every contestant alike instead of on whichever ran then.

Contestants, each with its own fresh copy of the packaged all-MiniLM-L6-v2
(fp32, dropout on), torch AdamW(lr 2e-5, weight decay 0.01) and gradient norms
clipped at configs/deepspeed/zero2.json's ``gradient_clipping``:

- ``st-cmnrl-<m>``: what sentence-transformers' trainer does per step, timed
  whole: each column through ``model.preprocess`` (its data collator's call:
  the column padded to its longest text), CMNRL(scale 20, mini_batch_size m),
  ``backward``, clipping, ``optimizer.step``, ``zero_grad``;
- ``ds-default``: ``ContrastiveEngine`` with zero2.json, InfoNCE(temperature
  0.05) and no chunking, planner or retain argument: the library's defaults
  when the benchmark runs; ``train_step`` on the raw strings, timed whole
  (tokenization included, as on the other side);
- ``ds-fill-<T>``: the old greedy fixed budget, ``planner="fill",
  chunk_tokens=T``, for each T of ``--sweep``, with the default retained
  graphs: the sweep isolates the planner (is the default as fast as the best
  hand-picked budget?).

Workloads, each at every global batch size of ``--batches`` (every contestant
gets the same batches, drawn from the workload's pool by a seeded RNG):

- ``stdlib``: the built-in real (docstring summary, rest) pairs, truncated at
  the model's own max_seq_length (256);
- ``longtail``: queries of U[6, 64] tokens, documents log-normal (median 90,
  sigma 0.7, clipped to [16, 512]) tokens, [CLS] and [SEP] included; each text
  is n - 2 one-token words of MiniLM's vocabulary (bench/gpu_bench/workloads.py's
  "realistic" texts, words of 3 letters or more), checked against the
  tokenizer; truncated at the model's own max_seq_length (256) on both sides,
  as a user who keeps the defaults gets (``--longtail_max_length 512`` keeps
  the whole tail; CMNRL's mini-batch of 128 then needs about 46 GB).

Per contestant: seconds per step (median of the timed steps, after
``--warmup`` untimed steps on batches of at most WARMUP_ROWS rows, which pay
the first call's allocations), its speed-up over each CMNRL contestant, and per
step the real (attention-mask) and padded tokens one pass of the encoder saw
(CMNRL trims each mini-batch to its longest row, as the installed
sentence-transformers does; the engine reports its chunks' padding). The JSON is
rewritten after every (workload, batch); a markdown table ends the run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpu_bench.clock import log  # noqa: E402
from gpu_bench.environment import git_state  # noqa: E402
from gpu_bench.workloads import draw_lengths, make_texts, vocabulary  # noqa: E402

if TYPE_CHECKING:
    import torch

ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"
LR, WEIGHT_DECAY = 2e-5, 0.01
TEMPERATURE, SCALE = 0.05, 20.0
COLUMNS = ("anchor", "positive")
WORKLOADS = ("stdlib", "longtail")
LONGTAIL_POOL = 4096  # pairs; at least the largest batch
WARMUP_ROWS = 64
CHECKED_TEXTS = 64  # longtail texts per column whose token count is checked against the tokenizer

Batch = dict[str, list[str]]


class Contestant(Protocol):
    """One side's step: ``step`` is what is timed; ``measures`` reads its token counts afterwards, untimed."""

    name: str
    side: str

    def step(self, batch: Batch) -> Any: ...

    def measures(self, out: Any) -> dict[str, float]: ...

    def settings(self) -> dict[str, Any]: ...


# --- the model and the data --------------------------------------------------------------------------


def fresh_model(max_seq_length: int | None):
    """A new copy of the packaged MiniLM (the engine reads max_seq_length when it is built: set it first)."""
    from ds_contrastive.run.options import BUILTIN_MODEL
    from ds_contrastive.run.setup import load_model

    model = load_model(BUILTIN_MODEL)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model.train()


def longtail_pool(rows: int, seed: int) -> Batch:
    """Long-tailed synthetic pairs whose token counts are exact, checked on a sample."""
    from transformers import AutoTokenizer

    from ds_contrastive.run.options import BUILTIN_MODEL
    from ds_contrastive.run.setup import resolve_model_path

    path = Path(resolve_model_path(BUILTIN_MODEL))
    words = [w for w in vocabulary(path) if len(w) >= 3]
    lengths = dict(zip(COLUMNS, draw_lengths("realistic", rows)))
    pool = {c: make_texts(words, lengths[c], seed + k, stream_words=1 << 20) for k, c in enumerate(COLUMNS)}
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    for c in COLUMNS:
        got = [len(ids) for ids in tokenizer(pool[c][:CHECKED_TEXTS])["input_ids"]]
        if got != lengths[c][:CHECKED_TEXTS].tolist():
            raise RuntimeError(f"longtail {c} texts do not tokenize to their drawn lengths")
    return pool


def workload(name: str, largest_batch: int, seed: int, longtail_max_length: int | None
             ) -> tuple[Batch, int | None]:
    """The workload's pool of pairs and the max_seq_length both sides use (None: the model's own)."""
    from ds_contrastive.run.setup import builtin_split

    if name == "stdlib":
        return builtin_split("train"), None
    return longtail_pool(max(LONGTAIL_POOL, largest_batch), seed), longtail_max_length


def draw_batches(pool: Batch, rows: int, count: int, seed: int) -> list[Batch]:
    """``count`` global batches of ``rows`` distinct pairs: batch i is every contestant's step i."""
    size = len(pool[COLUMNS[0]])
    if rows > size:
        raise SystemExit(f"a batch of {rows} is larger than the pool ({size} pairs)")
    rng = random.Random(seed)
    picks = [rng.sample(range(size), rows) for _ in range(count)]
    return [{c: [pool[c][i] for i in pick] for c in COLUMNS} for pick in picks]


# --- the contestants ---------------------------------------------------------------------------------


def gradient_clipping() -> float:
    """zero2.json's clipping, which the engine applies: the sentence-transformers side clips alike."""
    return float(json.loads(ZERO2.read_text()).get("gradient_clipping", 0.0))


class CachedMNRLTrainerStep:
    """One step of sentence-transformers' trainer with CachedMultipleNegativesRankingLoss."""

    side = "sentence-transformers"

    def __init__(self, mini_batch_size: int, max_seq_length: int | None) -> None:
        import torch
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        self.name = f"st-cmnrl-{mini_batch_size}"
        self.mini_batch_size = mini_batch_size
        self.clip = gradient_clipping()
        self.model = fresh_model(max_seq_length)
        self.loss = CachedMultipleNegativesRankingLoss(self.model, scale=SCALE, mini_batch_size=mini_batch_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(self, batch: Batch) -> list[torch.Tensor]:
        """The collator's tokenization, the cached loss and its backward, clipping, the update; the masks."""
        import torch

        features = [self.features(batch[c]) for c in COLUMNS]
        self.loss(features, None).backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return [f["attention_mask"] for f in features]

    def features(self, texts: list[str]) -> dict[str, Any]:
        """One column as the trainer feeds it: padded to its longest text, on the model's device."""
        import torch

        device = self.model.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.model.preprocess(texts).items()}

    def measures(self, masks: list[torch.Tensor]) -> dict[str, float]:
        """Real and padded tokens of one pass: each mini-batch runs at the width of its longest row."""
        real = sum(float(m.sum()) for m in masks)
        padded = 0.0
        for mask in masks:
            for begin in range(0, len(mask), self.mini_batch_size):
                rows = mask[begin:begin + self.mini_batch_size]
                padded += len(rows) * int(rows.sum(dim=1).max())
        return {"tokens": real, "padded_tokens": padded, "padding_fraction": 1 - real / padded}

    def settings(self) -> dict[str, Any]:
        return {"mini_batch_size": self.mini_batch_size, "scale": SCALE, "gradient_clipping": self.clip,
                "max_seq_length": self.model.max_seq_length}


class EngineStep:
    """One ``ContrastiveEngine.train_step`` on the raw strings, tokenization included; ``**settings`` go to it."""

    side = "ds_contrastive"

    def __init__(self, name: str, max_seq_length: int | None, **settings: Any) -> None:
        import ds_contrastive as dc

        self.name = name
        self.engine = dc.ContrastiveEngine(fresh_model(max_seq_length), loss=dc.InfoNCE(temperature=TEMPERATURE),
                                           ds_config=str(ZERO2), lr=LR, weight_decay=WEIGHT_DECAY, **settings)

    def step(self, batch: Batch) -> dict[str, float]:
        return self.engine.train_step(batch)

    def measures(self, metrics: dict[str, float]) -> dict[str, float]:
        padding = metrics["padding_fraction"]
        return {"tokens": metrics["tokens"], "padded_tokens": metrics["tokens"] / (1 - padding),
                "padding_fraction": padding, "chunks": metrics["chunks"], "kept_chunks": metrics["kept_chunks"],
                "engine_time_step": metrics["time_step"]}

    def settings(self) -> dict[str, Any]:
        """The step's resolved settings: its public plain attributes, whatever this version of the engine has."""
        plain = (bool, int, float, str, type(None))
        return {k: v for k, v in vars(self.engine.step).items() if not k.startswith("_") and isinstance(v, plain)}


def contestants(st_mini_batches: list[int], sweep: list[int], max_seq_length: int | None) -> list[Contestant]:
    """Every contestant of one workload, in round-robin order: the two sides alternate where they can."""
    st = [CachedMNRLTrainerStep(m, max_seq_length) for m in st_mini_batches]
    ours = [EngineStep("ds-default", max_seq_length)]
    ours += [EngineStep(f"ds-fill-{t}", max_seq_length, planner="fill", chunk_tokens=t) for t in sweep]
    order: list[Contestant] = []
    for k in range(max(len(st), len(ours))):
        order += st[k:k + 1] + ours[k:k + 1]
    return order


# --- the race ----------------------------------------------------------------------------------------


def race(players: list[Contestant], batches: list[Batch], warmup: int, label: str) -> dict[str, list[dict]]:
    """Step i of every contestant in turn on batch i; the records of the timed steps, by contestant."""
    records: dict[str, list[dict]] = {c.name: [] for c in players}
    for i, batch in enumerate(batches):
        for c in players:
            start = time.perf_counter()
            out = c.step(batch)
            seconds = time.perf_counter() - start
            log(f"{label} step {i}{' (warm-up)' if i < warmup else ''} {c.name}: {seconds:.2f} s")
            if i >= warmup:
                records[c.name].append({"seconds": seconds, **c.measures(out)})
    return records


def summary(c: Contestant, steps: list[dict]) -> dict[str, Any]:
    """Median seconds per step and the mean per-step token counts of one contestant's timed steps."""
    tokens = sum(s["tokens"] for s in steps)
    padded = sum(s["padded_tokens"] for s in steps)
    out = {"name": c.name, "side": c.side, "settings": c.settings(),
           "seconds_per_step": statistics.median(s["seconds"] for s in steps),
           "step_seconds": [s["seconds"] for s in steps],
           "tokens": tokens / len(steps), "padded_tokens": padded / len(steps), "padding_fraction": 1 - tokens / padded}
    for key in ("chunks", "kept_chunks"):
        if key in steps[0]:
            out[key] = statistics.mean(s[key] for s in steps)
    out["steps"] = steps
    return out


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each contestant's speed-up over every CMNRL contestant: its median step time over theirs."""
    st = [r for r in rows if r["side"] == "sentence-transformers"]
    for r in rows:
        r["speedup_vs"] = {s["name"]: s["seconds_per_step"] / r["seconds_per_step"] for s in st}
    return rows


def run_item(name: str, pool: Batch, max_seq_length: int | None, rows: int, args: argparse.Namespace) -> dict:
    """One (workload, batch): build its contestants, race them, free them."""
    batches = (draw_batches(pool, min(rows, WARMUP_ROWS), args.warmup, args.seed + 1)
               + draw_batches(pool, rows, args.steps, args.seed))
    players = contestants(args.st_mini_batches, args.sweep, max_seq_length)
    log(f"{name}/{rows}: built {', '.join(c.name for c in players)}")
    records = race(players, batches, args.warmup, f"{name}/{rows}")
    results = with_speedups([summary(c, records[c.name]) for c in players])
    del players
    gc.collect()
    return {"workload": name, "global_batch": rows, "max_seq_length_override": max_seq_length, "contestants": results}


# --- the report ----------------------------------------------------------------------------------------


def environment(threads: int) -> dict[str, Any]:
    import deepspeed
    import sentence_transformers
    import torch
    import transformers

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": threads,
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "git": git_state()}


def table(report: dict) -> str:
    """Markdown: one row per contestant of every (workload, batch)."""
    st = [f"st-cmnrl-{m}" for m in report["arguments"]["st_mini_batches"]]
    head = ["workload", "batch", "contestant", "s/step", *(f"vs {s}" for s in st), "padding fraction",
            "real tokens", "padded tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for item in report["results"]:
        for c in item["contestants"]:
            ratios = [f"{c['speedup_vs'][s]:.2f}x" for s in st]
            cells = [item["workload"], str(item["global_batch"]), c["name"], f"{c['seconds_per_step']:.2f}", *ratios,
                     f"{c['padding_fraction']:.3f}", f"{c['tokens']:,.0f}", f"{c['padded_tokens']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="stdlib,longtail", type=lambda s: [w for w in s.split(",") if w])
    parser.add_argument("--batches", default="128,512", type=numbers, help="global batch sizes")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contestant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per contestant first")
    parser.add_argument("--sweep", default="1024,2048,4096,16384", type=numbers,
                        help="chunk_tokens of the ds-fill contestants ('' for none)")
    parser.add_argument("--st_mini_batches", default="32,128", type=numbers, help="CMNRL mini_batch_size values")
    parser.add_argument("--longtail_max_length", type=int, default=None,
                        help="max_seq_length of both sides on longtail (default: the model's own, 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / f"cpu-vs-st-{datetime.date.today().isoformat()}.json")
    args = parser.parse_args()
    if set(args.workloads) - set(WORKLOADS):
        parser.error(f"--workloads: choose among {', '.join(WORKLOADS)}")
    if args.steps < 1 or not args.st_mini_batches:
        parser.error("--steps must be >= 1 and --st_mini_batches must name at least one size")
    return args


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    from ds_contrastive.core.runtime import shutdown
    from ds_contrastive.run.options import BUILTIN_MODEL

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    report = {"benchmark": "cpu_vs_st", "model": BUILTIN_MODEL, "environment": environment(args.threads),
              "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": []}
    for name in args.workloads:
        pool, max_seq_length = workload(name, max(args.batches), args.seed, args.longtail_max_length)
        log(f"{name}: a pool of {len(pool[COLUMNS[0]])} pairs")
        for rows in args.batches:
            report["results"].append(run_item(name, pool, max_seq_length, rows, args))
            write(report, args.out)
    print(table(report))
    print(f"\nwritten to {args.out}")
    shutdown()


if __name__ == "__main__":
    main()
