"""Worker for tests/test_nonfinite.py: a non-finite loss on one rank skips the step on every rank.

Rank 1's embeddings are made NaN (a forward hook) on chosen steps. A skipped
step must leave every parameter as it was, count itself, and let the next
step train; ``max_nonfinite_steps`` consecutive ones raise NonFiniteLoss on
every rank.
"""

import torch
from helpers import corpus, load_model, worker_main

import ds_contrastive as dc
from ds_contrastive.core.collectives import all_gather_objects
from ds_contrastive.core.runtime import world


def params(engine) -> torch.Tensor:
    import deepspeed

    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps) if engine.zero_stage == 3 else torch.no_grad():
        return torch.cat([p.detach().float().flatten().clone() for p in ps])


def run(model_dir: str, stage: int) -> dict:
    rank, size = world()
    engine = dc.ContrastiveEngine(load_model(model_dir), dc.InfoNCE(temperature=0.05), chunk_tokens=120,
                                  ds_config={"zero_optimization": {"stage": stage}, "gradient_clipping": 1.0},
                                  lr=1e-3, max_length=32, max_nonfinite_steps=2,
                                  lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)))
    poison = {"now": False}

    def hook(module, inputs, output):
        if poison["now"] and rank == 1:
            output["sentence_embedding"] = output["sentence_embedding"] * float("nan")
        return output

    engine.module.model.register_forward_hook(hook)
    data = corpus(8 * size, 1, seed=5)
    shard = {k: v[rank::size] for k, v in data.items()}
    steps = []
    for step, bad in enumerate([False, True, False, True, True]):
        poison["now"] = bad
        before = params(engine)
        try:
            metrics = engine.train_step(shard)
        except dc.NonFiniteLoss as e:
            steps.append({"step": step, "raised": str(e)})
            break
        moved = float((params(engine) - before).abs().max())
        steps.append({"step": step, "skipped": metrics["skipped"], "skipped_steps": metrics["skipped_steps"],
                      "moved": moved, "loss": metrics["loss"], "lr": metrics["lr"]})
    return {"rank": all_gather_objects(steps)}


def build(args) -> dict:
    return {f"zero{stage}": run(args.model, stage) for stage in map(int, args.stages.split(","))}


if __name__ == "__main__":
    worker_main(build, {"--stages": {"default": "2,3"}})
