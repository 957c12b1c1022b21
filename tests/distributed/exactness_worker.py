"""Worker for tests/test_exactness.py: engine steps vs the single-process full-batch reference.

Every rank runs the engine on its (unequal) shard for each ZeRO stage, chunk
budget and loss setting; rank 0 also runs the plain-PyTorch reference on the
whole global batch and writes the relative parameter errors to --out.
"""

import contextlib
import json
import sys

import deepspeed
import torch
from helpers import corpus, load_model, minilm_dir, worker_main
from reference import (
    param_groups,
    reference_embeddings,
    reference_guide_embeddings,
    reference_guided_loss,
    reference_loss,
    zero_fill_grads,
)

import ds_contrastive as dc
from ds_contrastive.core.collectives import all_gather_objects
from ds_contrastive.core.runtime import world

ROWS, NEGATIVES, SEED, LR, MAX_LEN = 11, 1, 7, 0.1, 64
# (chunk_tokens, chunk_rows, retain_tokens), planned by the default planner (costs measured on this machine):
# "several_kept" keeps the first chunks' pass-1 graphs and re-runs the rest; "all_kept" keeps every chunk's
# by retain_tokens="auto" (a tiny model's graphs all fit the memory budget; DDP-free backends may keep the last
# one too).
BUDGETS = {"one_chunk": (None, 10**6, 0), "several": (120, None, 0), "one_per_chunk": (None, 1, 0),
           "several_kept": (60, None, 150), "all_kept": (120, None, "auto")}
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
LOSSES = {
    "qd_fixed": lambda guide: dc.InfoNCE(temperature=0.05),
    "all_dirs_learnable": lambda guide: dc.InfoNCE(temperature=0.05, learnable_temperature=True,
                                                   directions=ALL_DIRECTIONS),
    "guided": lambda guide: dc.GuidedInfoNCE(guide=guide, temperature=0.05, margin=0.05),
    "guided_relative_learnable": lambda guide: dc.GuidedInfoNCE(
        guide=guide, temperature=0.05, learnable_temperature=True, margin_strategy="relative", margin=0.1),
    "matryoshka": lambda guide: dc.Matryoshka(dc.InfoNCE(temperature=0.05), dims=(32, 16, 8),
                                              weights=(1.0, 0.5, 0.25)),
}


def reference_value(loss, emb, guide_emb, texts, scale) -> torch.Tensor:
    """The reference loss matching ``loss``'s settings."""
    if isinstance(loss, dc.Matryoshka):
        return sum(w * reference_value(loss.loss, emb[..., :d], guide_emb, texts, scale)
                   for d, w in zip(loss.dims, loss.weights))
    if isinstance(loss, dc.GuidedInfoNCE):
        return reference_guided_loss(emb, guide_emb, texts, scale, loss.margin_strategy, loss.margin,
                                     loss.contrast_anchors, loss.contrast_positives)
    return reference_loss(emb, texts, scale, loss.directions, loss.mask_duplicates)


def guide_unpartitioned(engine) -> bool:
    """Every guide parameter is a plain full tensor (ZeRO-3 never touched it)."""
    return all(not hasattr(p, "ds_id") and p.numel() > 0 for p in engine.guide.model.parameters())


def global_batch(step: int) -> dict[str, list[str]]:
    batch = corpus(ROWS, NEGATIVES, seed=100 + step)
    batch["positive"][7] = batch["positive"][2]  # a duplicate positive, on another rank when W > 1
    batch["anchor"][9] = batch["anchor"][1]
    return batch


def shard_of(batch: dict, rank: int, size: int) -> dict:
    sizes = [ROWS // size + (1 if r < ROWS % size else 0) for r in range(size)]
    start = sum(sizes[:rank])
    return {k: v[start : start + sizes[rank]] for k, v in batch.items()}


def flat_params(module, stage: int) -> dict[str, torch.Tensor]:
    params = list(module.named_parameters())
    ctx = deepspeed.zero.GatheredParameters([p for _, p in params]) if stage == 3 else contextlib.nullcontext()
    with ctx:
        return {n.removeprefix("model."): p.detach().float().clone() for n, p in params}


def rel(a: dict, b: dict, base: dict | None = None) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    den = sum(((b[k] - (base[k] if base else 0)) ** 2).sum() for k in b) ** 0.5
    return float(num / den)


def run(model_dir: str, guide_dir: str, stage: int, budget: str, loss_name: str, steps: int) -> dict:
    rank, size = world()
    tokens, rows, retain = BUDGETS[budget]
    loss = LOSSES[loss_name](guide_dir)
    cfg = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 10**8}, "gradient_clipping": 0.0,
           "zero_allow_untested_optimizer": True}
    # SGD, not Adam: Adam's update barely changes when the gradient is scaled (1/W or Wx would pass).
    engine = dc.ContrastiveEngine(load_model(model_dir), loss, ds_config=cfg, chunk_tokens=tokens,
                                  chunk_rows=rows, optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
                                  weight_decay=0.01, seed=SEED, max_length=MAX_LEN, retain_tokens=retain)
    forwards = []
    hook = engine.module.model.register_forward_hook(lambda *a: forwards.append(1))
    ref_model = load_model(model_dir)
    ref_model.train()
    ref_guide = load_model(guide_dir) if engine.guide is not None else None
    ref_params = [(f"model.{n}", p) for n, p in ref_model.named_parameters()]
    if loss.learnable_temperature:
        log_scale = torch.nn.Parameter(torch.tensor([loss.initial_log_scale()]))
        ref_params.append(("log_scale", log_scale))
    opt = torch.optim.SGD(param_groups(ref_params, 0.01), lr=LR)
    initial = {n.removeprefix("model."): p.detach().clone() for n, p in ref_params}
    results = {}
    for step in range(steps):
        batch = global_batch(step)
        forwards.clear()
        metrics = engine.train_step(shard_of(batch, rank, size))
        plans = all_gather_objects([(list(c.indices), c.dummy) for c in engine.last_plan.chunks])
        counts = all_gather_objects(len(forwards))
        unpartitioned = all_gather_objects(guide_unpartitioned(engine)) if engine.guide is not None else None
        got = flat_params(engine.module, stage)
        if rank != 0:
            continue
        shards = [list(shard_of(batch, r, size).values()) for r in range(size)]
        emb = reference_embeddings(ref_model, ref_model.tokenizer, shards, plans, SEED, step, MAX_LEN)
        scale = (log_scale.exp().clamp(max=loss.max_scale)[0] if loss.learnable_temperature
                 else torch.tensor(1 / loss.temperature))
        texts = list(batch.values())
        guide_emb = reference_guide_embeddings(ref_guide, texts, ref_guide.max_seq_length) if ref_guide else None
        opt.zero_grad()
        reference_value(loss, emb, guide_emb, texts, scale).backward()
        zero_fill_grads(ref_params)
        ref_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in ref_params])))
        opt.step()
        want = {n.removeprefix("model."): p.detach().clone() for n, p in ref_params}
        results[f"step{step + 1}"] = {
            "param_rel": rel(got, want),
            "update_rel": rel(got, want, initial),
            "grad_norm_rel": abs(metrics["grad_norm"] - ref_norm) / ref_norm,
            "forward_calls_per_rank": counts,
            "dummy_chunks": sum(d for plan in plans for _, d in plan),
            "chunks": len(plans[0]),
            "kept_chunks": metrics["kept_chunks"],
            "guide_unpartitioned": unpartitioned,
        }
    hook.remove()
    return results


def build(args) -> dict:
    report = {}
    for stage in map(int, args.stages.split(",")):
        for budget in args.budgets.split(","):
            for loss_name in args.losses.split(","):
                key = f"zero{stage}/{budget}/{loss_name}"
                report[key] = run(args.model, args.guide, stage, budget, loss_name, args.steps)
                if world()[0] == 0:
                    print(key, json.dumps(report[key]), file=sys.stderr, flush=True)
    return report


if __name__ == "__main__":
    worker_main(build, {
        "--stages": dict(default="0,1,2,3"),
        "--steps": dict(type=int, default=3),
        "--budgets": dict(default=",".join(BUDGETS)),
        "--losses": dict(default="qd_fixed,all_dirs_learnable"),
        "--guide": dict(default=str(minilm_dir())),
    })
