"""Worker for tests/test_hf_trainer.py: one ContrastiveTrainer step vs the core engine vs the reference.

Run on 2 ranks under the deepspeed launcher (``--stage N``: the Trainer gets a
ZeRO-N DeepSpeed config) or under torchrun (``--stage -1``: no DeepSpeed, the
Trainer wraps the model in DDP). Every rank:

1. trains one optimizer step with ContrastiveTrainer (SGD, constant lr,
   gradient clipping 0, fp32, dropout on) on a 12-row dataset, i.e. the
   whole dataset is the global batch, and records the shard it was given;
2. saves with ``trainer.save_model()`` and embeds texts with the in-memory model;
3. runs one ContrastiveEngine step (DeepSpeed, same ZeRO stage; ZeRO-2 for
   the DDP run) on the same shard, from the same initial weights.

With ``--learnable_temperature`` all three learn the temperature and its update is compared too.
Rank 0 reloads the saved model with ``SentenceTransformer(path)`` and runs the
single-process full-batch reference on the global batch in rank order, then
writes the relative differences to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import ClassVar

import torch

PER_DEVICE, NEGATIVES, SEED, LR, MAX_LEN, CHUNK_TOKENS = 6, 1, 11, 0.1, 64, 120
# Given, not measured: the Trainer and the engine must cut the same chunks (hence draw the same dropout masks);
# costs each measures for itself on a busy machine could tip the planner one way for one and not the other.
COSTS = dict(call=1.2e-3, token=4.6e-6, attention=6e-8)


def global_batch(rows: int) -> dict[str, list[str]]:
    from helpers import corpus

    batch = corpus(rows, NEGATIVES, seed=5)
    batch["positive"][rows - 1] = batch["positive"][2]  # a duplicate positive (on the other rank with 2 ranks)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True)
    # the Trainer keeps this many padded tokens of pass-1 graphs (the engine it is compared with keeps none)
    parser.add_argument("--retain_tokens", type=int, required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true",
                        help="the Trainer's own --gradient_checkpointing (the engine and the reference run without)")
    parser.add_argument("--learnable_temperature", action="store_true",
                        help="InfoNCE(learnable_temperature=True): the temperature's update is compared too")
    parser.add_argument("--ds_from_launcher", action="store_true",
                        help="DeepSpeed configured by `accelerate launch --use_deepspeed`, not by the arguments")
    args = parser.parse_args()
    from datasets import Dataset
    from exactness_worker import flat_params, rel
    from helpers import load_model
    from reference import param_groups, reference_embeddings, reference_loss, zero_fill_grads
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

    import ds_contrastive as dc
    from ds_contrastive import ContrastiveTrainer  # before the arguments, as a script imports it
    from ds_contrastive.core.collectives import all_gather_objects
    from ds_contrastive.core.runtime import world
    from ds_contrastive.losses.guide_model import outside_zero3_init

    size = int(os.environ.get("WORLD_SIZE", "1"))
    # DeepSpeed gives a parameter without gradient (BERT's pooler under mean pooling) a zero gradient, so
    # weight decay reaches it; DDP leaves its grad None and torch optimizers skip it. Both are the same
    # step; only decay tells them apart, so the DDP run compares without it.
    weight_decay = 0.01 if args.stage >= 0 else 0.0
    batch = global_batch(PER_DEVICE * size)
    loss = dc.InfoNCE(temperature=0.05, learnable_temperature=args.learnable_temperature)
    # Every model is loaded before the TrainingArguments exist: a ZeRO-3 config there would partition them at load.
    trainer_model, engine_model, ref_model = (load_model(args.model) for _ in range(3))
    initial = {n: p.detach().clone() for n, p in ref_model.named_parameters()}

    ds_config = None
    if args.stage >= 0 and not args.ds_from_launcher:
        ds_config = {"zero_optimization": {"stage": args.stage, "reduce_bucket_size": 10**8},
                     "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                     "zero_allow_untested_optimizer": True}
    out_dir = os.path.join(os.path.dirname(args.out), f"trainer-{args.stage}")
    training_args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=PER_DEVICE, max_steps=1, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", weight_decay=weight_decay, max_grad_norm=0.0, seed=SEED, deepspeed=ds_config,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=args.checkpointing,
        use_cpu=not torch.cuda.is_available())  # on a CPU-only host accelerate otherwise counts one process

    reductions: list[int] = []  # DDP: gradient all-reduces (bucket hook calls) during each chunk's backward

    def counting_allreduce(state, bucket):
        reductions[-1] += 1
        return torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook(None, bucket)

    class Recording(ContrastiveTrainer):
        """Keeps the shard each training step received; under DDP counts reductions per chunk."""

        shards: ClassVar[list[dict[str, list[str]]]] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.shards.append({k: list(v) for k, v in inputs.items()})
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not self.shards[1:]:
                model.register_comm_hook(None, counting_allreduce)
            return super().training_step(model, inputs, num_items_in_batch)

        def backend(self, model):
            backend = super().backend(model)
            backward = backend.backward

            def counted(loss):
                reductions.append(0)
                backward(loss)

            backend.backward = counted
            return backend

    trainer = Recording(model=trainer_model, args=training_args, train_dataset=Dataset.from_dict(batch),
                        loss=loss, chunk_tokens=CHUNK_TOKENS, max_length=MAX_LEN,
                        chunk_costs=dc.ChunkCosts(**COSTS),
                        retain_tokens=args.retain_tokens)
    trainer.train()
    rank = world()[0]
    shard = trainer.shards[0]
    shards = all_gather_objects(shard)
    got_trainer = flat_params(trainer.model, args.stage)
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    backend = trainer.backend(trainer.model_wrapped)
    backend_name = type(backend).__name__ + ("(DDP)" if getattr(backend, "ddp", False) else "")

    # save_model, then the same texts through the in-memory model (collective under ZeRO-3) and the saved one
    save_dir = os.path.join(out_dir, "saved")
    trainer.save_model(save_dir)
    probe = batch["anchor"] + batch["positive"]
    trainer.model.eval()
    with torch.no_grad():
        in_memory = trainer.model.encode(probe, convert_to_tensor=True, batch_size=8).float()

    engine = dc.ContrastiveEngine(
        engine_model, loss,
        ds_config={"zero_optimization": {"stage": max(args.stage, 0) if args.stage >= 0 else 2},
                   "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True},
        chunk_tokens=CHUNK_TOKENS, chunk_costs=dc.ChunkCosts(**COSTS),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
        weight_decay=weight_decay, seed=SEED, max_length=MAX_LEN)
    metrics = engine.train_step(shard)
    plans = all_gather_objects([(list(c.indices), c.dummy) for c in engine.last_plan.chunks])
    got_engine = flat_params(engine.module, engine.zero_stage)
    if rank != 0:
        return

    with outside_zero3_init():  # a load on rank 0 alone must not enter ZeRO-3's collective zero.Init
        saved = SentenceTransformer(save_dir, device="cpu")
    loaded = saved.encode(probe, convert_to_tensor=True, batch_size=8)
    saved_scale_keys = [k for k in saved.state_dict() if "log_scale" in k]
    saved_info = json.loads(open(os.path.join(save_dir, "ds_contrastive.json")).read())
    texts = [[t for s in shards for t in s[col]] for col in shard]
    ref_model.train()
    params = [(f"model.{n}", p) for n, p in ref_model.named_parameters()]
    scale = torch.tensor(20.0)
    if loss.learnable_temperature:
        log_scale = torch.nn.Parameter(torch.tensor([loss.initial_log_scale()]))
        params.append(("log_scale", log_scale))
        initial["log_scale"] = log_scale.detach().clone()
        scale = log_scale.exp().clamp(max=loss.max_scale)[0]
    opt = torch.optim.SGD(param_groups(params, weight_decay), lr=LR)
    emb = reference_embeddings(ref_model, ref_model.tokenizer, [list(s.values()) for s in shards], plans, SEED, 0,
                               MAX_LEN)
    ref_loss = reference_loss(emb, texts, scale, ("query_to_doc",), True)
    ref_loss.backward()
    zero_fill_grads(params)
    ref_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in params])))
    opt.step()
    want = {n.removeprefix("model."): p.detach().clone() for n, p in params}
    if loss.learnable_temperature:  # the temperature's own update, from the Trainer, the engine and the reference
        only = {"log_scale": initial["log_scale"]}
        temperature = {"initial": float(initial["log_scale"]), "trainer": float(got_trainer["log_scale"]),
                       "engine": float(got_engine["log_scale"]), "reference": float(want["log_scale"])}
        temperature["trainer_update_vs_engine"] = rel({"log_scale": got_trainer["log_scale"]},
                                                      {"log_scale": got_engine["log_scale"]}, only)
        temperature["trainer_update_vs_reference"] = rel({"log_scale": got_trainer["log_scale"]},
                                                         {"log_scale": want["log_scale"]}, only)
    report = {
        "backend": backend_name,
        "ddp_reductions_per_chunk": reductions,
        "rows_per_rank": [len(s["anchor"]) for s in shards],
        "distinct_rows": len(set(texts[0])),
        "trainer_vs_reference": rel(got_trainer, want),
        "trainer_update_vs_reference": rel(got_trainer, want, initial),
        "trainer_vs_engine": rel(got_trainer, got_engine),
        "log_scale": temperature if loss.learnable_temperature else None,
        "engine_vs_reference": rel(got_engine, want),
        "loss": {"trainer": logged["loss"], "engine": metrics["loss"], "reference": float(ref_loss)},
        "grad_norm": {"trainer": logged.get("grad_norm"), "reference": ref_norm},
        "logged_keys": sorted(logged),
        "chunks_per_rank": logged["chunks"],
        "kept_chunks": logged["kept_chunks"],
        "saved_vs_in_memory": float((loaded.float() - in_memory).norm() / in_memory.norm()),
        "trained": rel(got_trainer, initial),
        "saved_log_scale_keys": saved_scale_keys,
        "saved_info": saved_info,
        "checkpointing": bool(trainer.model[0].auto_model.is_gradient_checkpointing),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
    from ds_contrastive.core.runtime import shutdown

    shutdown()  # every rank leaves together, after rank 0's report
