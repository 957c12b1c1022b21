"""CPU variant of the throughput benchmark: the engine's cost over the encoder's own, and what one step issues.

Run under the deepspeed launcher (2 CPU ranks, gloo):

    deepspeed --num_gpus 2 --master_port 29555 bench/cpu_overhead.py --out bench/results/cpu-$(date +%F).json

On a small random-init BERT (hidden 128, 4 layers) and a global batch of
variable-length (anchor, positive, hard negative) texts, for ZeRO-2 and
ZeRO-3, each re-running every chunk in pass 2 (``retain_tokens=0``) and
keeping every pass-1 graph, with the next shard tokenized in the prefetch
thread, it records per step, on every rank:

- the engine's step time (median over the timed steps);
- the floor: a no-grad forward plus a forward/backward of exactly the chunks
  the engine fed the encoder (same sequences, same padding), on a plain copy
  of the model outside DeepSpeed; and the ratio step / floor;
- the reducing collectives DeepSpeed issued (gradient reductions) and the
  encoder forward calls.

CPU numbers say what the engine adds in bookkeeping (tokenization, gather,
loss, DeepSpeed's hooks); GPU throughput is bench's GPU script's business.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

REDUCING = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_reduce_coalesced", "reduce")


def texts(rows: int, seed: int) -> dict[str, list[str]]:
    """Variable-length pseudo-sentences: anchors 4-24 words, documents 8-90 words (long-tailed)."""
    from helpers import WORDS

    g = torch.Generator().manual_seed(seed)

    def sentence(words: int) -> str:
        return " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (words,), generator=g))

    def doc_words() -> int:
        return min(90, 8 + int(torch.empty(1).exponential_(1 / 20, generator=g)))

    return {"anchor": [sentence(int(torch.randint(4, 25, (1,), generator=g))) for _ in range(rows)],
            "positive": [sentence(doc_words()) for _ in range(rows)],
            "negative": [sentence(doc_words()) for _ in range(rows)]}


def floor_seconds(model, tokens, plan, reps: int) -> float:
    """No-grad forward + forward/backward of the engine's chunks, on a plain model."""
    chunks = [tokens.features(c.indices, torch.device("cpu")) for c in plan.chunks if not c.dummy]
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        with torch.no_grad():
            for f in chunks:
                model(dict(f))
        for f in chunks:
            model(dict(f))["sentence_embedding"].float().sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model_dir: str, stage: int, retain: int, rows: int, chunk_tokens: int, steps: int) -> dict:
    import deepspeed.comm.comm as ds_comm
    from helpers import load_model

    import ds_contrastive as dc
    from ds_contrastive.core.collectives import all_gather_objects
    from ds_contrastive.core.runtime import world
    from ds_contrastive.core.shard import tokenize, validate_shard

    rank, size = world()
    engine = dc.ContrastiveEngine(load_model(model_dir), dc.InfoNCE(), chunk_tokens=chunk_tokens, retain_tokens=retain,
                                  ds_config={"zero_optimization": {"stage": stage}, "gradient_clipping": 1.0})
    # reducing collectives, by phase: from the first pass-2 backward to step() (the gradient reductions,
    # including the flush when the coalescing context closes), or in step() (gradient norm, overflow check)
    reductions = {"backward": 0, "step": 0}
    phase = {"now": None}
    for name in REDUCING:
        original = getattr(ds_comm.cdb, name, None)
        if original is not None:
            def counted(*a, __original=original, **k):
                if phase["now"]:
                    reductions[phase["now"]] += 1
                return __original(*a, **k)
            setattr(ds_comm.cdb, name, counted)
    def entering(method: str, original):
        def wrapped(*a, **k):
            phase["now"] = method
            try:
                return original(*a, **k)
            finally:
                phase["now"] = "backward" if method == "backward" else None  # stays open until step()
        return wrapped

    for method in ("backward", "step"):
        setattr(engine.engine, method, entering(method, getattr(engine.engine, method)))
    forwards = {"n": 0}
    engine.module.model.register_forward_hook(lambda *a: forwards.__setitem__("n", forwards["n"] + 1))
    per_step = []
    shards = [{k: v[rank::size] for k, v in texts(rows, seed=100 + step).items()} for step in range(steps + 1)]
    # as launch/train.py does: the next shard is tokenized in a background thread during this step
    for step, prepared in enumerate(dc.prefetched(engine.prepare, shards)):  # step 0 warms up
        reductions.update(backward=0, step=0)
        forwards["n"] = 0
        start = time.perf_counter()
        metrics = engine.train_step(prepared)
        seconds = time.perf_counter() - start
        per_step.append({"seconds": seconds, "backward_reductions": reductions["backward"],
                         "step_reductions": reductions["step"], "forwards": forwards["n"],
                         "chunks": len(engine.last_plan), "kept": metrics["kept_chunks"],
                         "tokens_per_second": metrics["tokens_per_second"],
                         "padding_fraction": metrics["padding_fraction"]})
    shard = shards[-1]
    # the floor of the last step's chunks, on a plain copy of the model
    plain = load_model(model_dir).train()
    validated = validate_shard(shard, "anchor", "positive")
    tokens = tokenize(engine.step.tokenizer, validated.flat(), engine.step.max_length, engine.step.lowercase)
    floor = floor_seconds(plain, tokens, engine.last_plan, reps=3)
    timed = per_step[1:]
    mine = {
        "step_seconds": statistics.median(s["seconds"] for s in timed),
        "floor_seconds": floor,
        "gradient_reductions_per_step": sorted({s["backward_reductions"] for s in timed}),
        "optimizer_step_reductions_per_step": sorted({s["step_reductions"] for s in timed}),
        "forward_calls_per_step": sorted({s["forwards"] for s in timed}),
        "chunks": timed[-1]["chunks"],
        "kept_chunks": timed[-1]["kept"],
        "padding_fraction": statistics.mean(s["padding_fraction"] for s in timed),
    }
    mine["step_over_floor"] = mine["step_seconds"] / floor
    return {"rank": all_gather_objects(mine), "global_batch": rows, "ranks": size, "zero_stage": stage,
            "retain_tokens": retain}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--chunk_tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--retain", default="0,1000000", help="retain_tokens values to run (comma-separated)")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    from helpers import tiny_bert_dir

    from ds_contrastive.core.collectives import all_gather_objects
    from ds_contrastive.core.runtime import init_process_group, shutdown, world

    init_process_group()
    root = Path(os.environ.get("BENCH_TMP", "/tmp/ds_contrastive_bench"))
    model_dir = tiny_bert_dir(root, hidden=128, layers=4, dropout=0.1) if world()[0] == 0 else None
    model_dir = all_gather_objects(str(model_dir) if model_dir else None)[0]
    report = {"machine": "CPU (2 cores), gloo", "torch": torch.__version__, "model": "random BERT 128x4",
              "runs": [run(model_dir, stage, int(retain), args.rows, args.chunk_tokens, args.steps)
                       for stage in (2, 3) for retain in args.retain.split(",")]}
    if world()[0] == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        for r in report["runs"]:
            for k, m in enumerate(r["rank"]):
                print(f"zero{r['zero_stage']} retain {r['retain_tokens']} rank {k}: step {m['step_seconds']:.3f} s, floor {m['floor_seconds']:.3f} s, "
                      f"x{m['step_over_floor']:.2f}, gradient reductions/step {m['gradient_reductions_per_step']} "
                      f"(+{m['optimizer_step_reductions_per_step']} in step()), "
                      f"forwards/step {m['forward_calls_per_step']}, chunks {m['chunks']} (kept {m['kept_chunks']:.0f})",
                      flush=True)
    shutdown()


if __name__ == "__main__":
    main()
