"""Worker for tests/test_exactness.py: engine steps vs the single-process full-batch reference.

Every rank runs the engine on its (unequal) shard for each ZeRO stage, chunk
budget and loss setting; rank 0 also runs the plain-PyTorch reference on the
whole global batch and writes the relative parameter errors to --out.
``--decoders`` adds tiny decoder LLMs (last-token pooling) as they are, with
LoRA adapters (the reference draws the same initialisation) and with gradient
checkpointing (the reference runs without it).
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
from ds_contrastive.run.options import ModelOptions
from ds_contrastive.run.setup import add_lora, enable_gradient_checkpointing

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
    # the student's own pass-1 embeddings guide: GIST's rule, and only what scores above the positive by 0.02
    "self_guided": lambda guide: dc.GuidedInfoNCE(guide="self", temperature=0.05, margin=0.0),
    "self_guided_above": lambda guide: dc.GuidedInfoNCE(guide="self", temperature=0.05, margin=-0.02),
    "matryoshka": lambda guide: dc.Matryoshka(dc.InfoNCE(temperature=0.05), dims=(32, 16, 8),
                                              weights=(1.0, 0.5, 0.25)),
    "matryoshka_self_guided": lambda guide: dc.Matryoshka(dc.GuidedInfoNCE(guide="self", temperature=0.05),
                                                          dims=(32, 16), weights=(1.0, 0.5)),
}


LORA = ModelOptions(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"])
# decoder settings: (variant, budget); checkpointing with re-run chunks only and with kept pass-1 graphs
DECODER_RUNS = (("plain", "several"), ("lora", "several_kept"), ("checkpointing", "several"),
                ("checkpointing", "several_kept"))


def prepared(model_dir: str, variant: str, reference: bool):
    """The model of a run: LoRA seeded alike for engine and reference; checkpointing for the engine only."""
    model = load_model(model_dir)
    if variant == "lora":
        add_lora(model, LORA, SEED)
    elif variant == "checkpointing" and not reference:
        enable_gradient_checkpointing(model)
    return model


def reference_value(loss, emb, guide_emb, texts, scale) -> torch.Tensor:
    """The reference loss matching ``loss``'s settings."""
    if isinstance(loss, dc.Matryoshka):
        if getattr(loss.loss, "self_guided", False):  # every size masks by the full embeddings' similarities
            guide_emb = emb.detach()
        return sum(w * reference_value(loss.loss, emb[..., :d], guide_emb, texts, scale)
                   for d, w in zip(loss.dims, loss.weights))
    if isinstance(loss, dc.GuidedInfoNCE):
        if loss.self_guided and guide_emb is None:  # the same forward's embeddings, without their gradient
            guide_emb = emb.detach()
        return reference_guided_loss(emb, guide_emb, texts, scale, loss.margin_strategy, loss.margin,
                                     loss.contrast_anchors, loss.contrast_positives)
    return reference_loss(emb, texts, scale, loss.directions, loss.mask_duplicates)


def guide_unpartitioned(engine) -> bool:
    """Every guide parameter is a plain full tensor (ZeRO-3 never touched it)."""
    return all(not hasattr(p, "ds_id") and p.numel() > 0 for p in engine.guide.model.parameters())


def largest_frozen_partitioned(module) -> bool | None:
    """Whether this rank holds only a slice of the largest frozen parameter (None: nothing is frozen).

    ZeRO-3 keeps parameters below its persistence threshold whole: the largest one is partitioned if any is.
    """
    frozen = [p for p in module.parameters() if not p.requires_grad]
    if not frozen:
        return None
    largest = max(frozen, key=lambda p: getattr(p, "ds_numel", p.numel()))
    return hasattr(largest, "ds_tensor") and largest.ds_tensor.numel() < largest.ds_numel


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


def run(model_dir: str, guide_dir: str, stage: int, budget: str, loss_name: str, steps: int,
        variant: str = "plain") -> dict:
    rank, size = world()
    tokens, rows, retain = BUDGETS[budget]
    loss = LOSSES[loss_name](guide_dir)
    cfg = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 10**8}, "gradient_clipping": 0.0,
           "zero_allow_untested_optimizer": True}
    # SGD, not Adam: Adam's update barely changes when the gradient is scaled (1/W or Wx would pass).
    engine = dc.ContrastiveEngine(prepared(model_dir, variant, reference=False), loss, ds_config=cfg, chunk_tokens=tokens,
                                  chunk_rows=rows, optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
                                  weight_decay=0.01, seed=SEED, max_length=MAX_LEN, retain_tokens=retain)
    forwards = []
    hook = engine.module.model.register_forward_hook(lambda *a: forwards.append(1))
    ref_model = prepared(model_dir, variant, reference=True)
    ref_model.train()
    ref_guide = load_model(guide_dir) if engine.guide is not None else None
    ref_params = [(f"model.{n}", p) for n, p in ref_model.named_parameters() if p.requires_grad]
    if loss.learnable_temperature:
        log_scale = torch.nn.Parameter(torch.tensor([loss.initial_log_scale()]))
        ref_params.append(("log_scale", log_scale))
    opt = torch.optim.SGD(param_groups(ref_params, 0.01), lr=LR)
    initial = {n.removeprefix("model."): p.detach().clone() for n, p in ref_params}
    trained = set(initial)
    frozen = {n: p.detach().clone() for n, p in ref_model.named_parameters() if not p.requires_grad}
    results = {}
    for step in range(steps):
        batch = global_batch(step)
        forwards.clear()
        metrics = engine.train_step(shard_of(batch, rank, size))
        plans = all_gather_objects([(list(c.indices), c.dummy) for c in engine.last_plan.chunks])
        counts = all_gather_objects(len(forwards))
        unpartitioned = all_gather_objects(guide_unpartitioned(engine)) if engine.guide is not None else None
        every = flat_params(engine.module, stage)
        got = {n: p for n, p in every.items() if n in trained}
        frozen_moved = [n for n, p in frozen.items() if not torch.equal(every[n], p)]
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
            "trained_tensors": len(trained),
            "frozen_moved": frozen_moved,
            "largest_frozen_partitioned": largest_frozen_partitioned(engine.module),
            "masked_fraction": metrics.get("guide_masked_fraction_anchor_doc"),
            "checkpointing": bool(getattr(engine.module.model[0].auto_model, "is_gradient_checkpointing", False)),
        }
    hook.remove()
    return results


def build(args) -> dict:
    runs = [(f"zero{stage}/{budget}/{loss_name}", args.model, stage, budget, loss_name, args.steps, "plain")
            for stage in map(int, args.stages.split(",")) for budget in args.budgets.split(",")
            for loss_name in args.losses.split(",")]
    for model_dir in filter(None, args.decoders.split(",")):
        arch = model_dir.rstrip("/").rsplit("/", 1)[-1]
        runs += [(f"zero{stage}/{budget}/qd_fixed/{arch}/{variant}", model_dir, stage, budget, "qd_fixed",
                  args.decoder_steps, variant)
                 for stage in map(int, args.decoder_stages.split(",")) for variant, budget in DECODER_RUNS]
    report = {}
    for key, model_dir, stage, budget, loss_name, steps, variant in runs:
        report[key] = run(model_dir, args.guide, stage, budget, loss_name, steps, variant)
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
        "--decoders": dict(default="", help="decoder model directories, comma-separated"),
        "--decoder_stages": dict(default="2,3"),
        "--decoder_steps": dict(type=int, default=2),
    })
