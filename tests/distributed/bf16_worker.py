"""Worker for tests/test_bf16.py: one bf16 step per ZeRO stage against the fp32 full-batch reference.

bf16 cannot match fp32 to 1e-5; the check is that the loss agrees within bf16
noise and that the update points the same way as the exact fp32 update.
"""

import torch
from exactness_worker import MAX_LEN, SEED, flat_params, global_batch, shard_of
from helpers import load_model, worker_main
from reference import param_groups, reference_embeddings, reference_loss, zero_fill_grads

import ds_contrastive as dc
from ds_contrastive.core.collectives import all_gather_objects
from ds_contrastive.core.runtime import world

LR = 1e-3


def run(model_dir: str, stage: int) -> dict | None:
    rank, size = world()
    cfg = {"zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "bf16": {"enabled": True}}
    engine = dc.ContrastiveEngine(load_model(model_dir), dc.InfoNCE(), ds_config=cfg, chunk_tokens=120,
                                  lr=LR, weight_decay=0.01, seed=SEED, max_length=MAX_LEN)
    batch = global_batch(0)
    metrics = engine.train_step(shard_of(batch, rank, size))
    plans = all_gather_objects([(list(c.indices), c.dummy) for c in engine.last_plan.chunks])
    got = flat_params(engine.module, stage)
    if rank != 0:
        return None
    ref = load_model(model_dir)
    ref.train()
    params = list(ref.named_parameters())
    initial = {n: p.detach().clone() for n, p in params}
    opt = torch.optim.AdamW(param_groups(params, 0.01), lr=LR, weight_decay=0.01)
    shards = [list(shard_of(batch, r, size).values()) for r in range(size)]
    emb = reference_embeddings(ref, ref.tokenizer, shards, plans, SEED, 0, MAX_LEN)
    loss = reference_loss(emb, list(batch.values()), torch.tensor(20.0), ("query_to_doc",), True)
    loss.backward()
    zero_fill_grads(params)
    opt.step()
    names = [n for n, _ in params]
    start = torch.cat([initial[n].bfloat16().float().flatten() for n in names])  # the engine starts in bf16
    ours = torch.cat([got[n].flatten() for n in names]) - start
    exact = torch.cat([p.detach().flatten() for _, p in params]) - torch.cat([initial[n].flatten() for n in names])
    return {
        "loss": metrics["loss"],
        "reference_loss": loss.item(),
        "update_cosine": float(torch.nn.functional.cosine_similarity(ours, exact, dim=0)),
        "dtype": str(next(engine.module.parameters()).dtype),
    }


if __name__ == "__main__":
    worker_main(lambda args: {f"zero{s}": run(args.model, s) for s in (0, 1, 2, 3)})
