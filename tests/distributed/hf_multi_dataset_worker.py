"""Worker for tests/distributed/test_hf_multi_dataset.py: ContrastiveTrainer on a two-dataset DatasetDict.

Run on 2 ranks under the deepspeed launcher with a ZeRO-``--stage`` config.
Two datasets with different columns, each with its own loss and prompt:
``qa`` (question, answer; InfoNCE; the questions prompted) and ``nli``
(anchor, positive, negative_0; self-guided GIST; every column prompted).
Dropout is off (the reference needs no chunk plans), SGD, constant lr, no
clipping. Every rank records, for each step, the dataset and shard it was
given and the parameters before and after. Runs:

1. PROPORTIONAL, one epoch (7 steps), a checkpoint at step 3, then
   ``evaluate()`` on a two-dataset eval DatasetDict;
2. a fresh model and Trainer resumed from that checkpoint, to the end;
3. ROUND_ROBIN, one epoch.

Rank 0 runs each step's single-process full-batch reference (that dataset's
global batch under that dataset's loss, from the recorded parameters) and
writes the comparisons to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter

import torch

PER_DEVICE, LR, MAX_LEN, SEED, SAVE_AT = 3, 0.1, 32, 7, 3
# global batches of 6: qa 4 and a last one of 2 rows (one per rank); nli 2 (its last row, fewer than the ranks, left out)
SIZES = {"qa": 26, "nli": 13}
PROMPTS = {"qa": {"question": "query: "}, "nli": "search: "}


def datasets(rows: dict[str, int]):
    from datasets import Dataset, DatasetDict
    from helpers import corpus

    qa = corpus(rows["qa"], 0, seed=1)
    return DatasetDict({"qa": Dataset.from_dict({"question": qa["anchor"], "answer": qa["positive"]}),
                        "nli": Dataset.from_dict(corpus(rows["nli"], 1, seed=2))})


def losses():
    import ds_contrastive as dc

    return {"qa": dc.InfoNCE(temperature=0.05), "nli": dc.GuidedInfoNCE(guide="self", temperature=0.05, margin=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    from exactness_worker import flat_params, rel
    from helpers import load_model
    from sentence_transformers import SentenceTransformerTrainingArguments

    import ds_contrastive as dc  # before the arguments, which start the process group
    from ds_contrastive.core.collectives import all_gather_objects
    from ds_contrastive.core.runtime import world

    stage = args.stage
    ds_config = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 10**8},
                 "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                 "zero_allow_untested_optimizer": True}
    root = os.path.join(os.path.dirname(args.out), f"multi-{stage}")

    class Recording(dc.ContrastiveTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.record: list[dict] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            before = flat_params(self.model, stage)  # gathered under ZeRO-3: every rank takes part
            shard = {k: list(v) for k, v in inputs.items() if k != "dataset_name"}
            entry = {"step": self.state.global_step, "dataset": inputs["dataset_name"], "shard": shard}
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.record.append({**entry, "before": before, "after": flat_params(self.model, stage)})
            return loss

    def trainer(name: str, order: str, **kwargs) -> Recording:
        # the model before the ZeRO-3 arguments: loaded whole on every rank, then partitioned by the engine
        model = load_model(args.model)
        training_args = SentenceTransformerTrainingArguments(
            output_dir=os.path.join(root, name), per_device_train_batch_size=PER_DEVICE, per_device_eval_batch_size=3,
            num_train_epochs=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=0.0, seed=SEED, deepspeed=ds_config, report_to="none", logging_steps=1,
            save_strategy="steps", save_steps=SAVE_AT, disable_tqdm=True, prompts=PROMPTS,
            multi_dataset_batch_sampler=order, use_cpu=not torch.cuda.is_available())
        # sentence-transformers sets it True under several ranks (a rank-local last batch could hang DDP); global
        # batches cannot, so the worker trains the short last batches too: qa's 2-row one, one row per rank
        training_args.dataloader_drop_last = False
        return Recording(model=model, args=training_args, train_dataset=datasets(SIZES), loss=losses(),
                         chunk_rows=4, max_length=MAX_LEN, planner="fill", **kwargs)

    straight = trainer("straight", "proportional", eval_dataset=datasets({"qa": 6, "nli": 6}))
    straight.train()
    evaluated = straight.evaluate()
    resumed = trainer("resumed", "proportional")
    resumed.train(resume_from_checkpoint=os.path.join(root, "straight", f"checkpoint-{SAVE_AT}"))
    round_robin = trainer("round_robin", "round_robin")
    round_robin.train()

    rank, size = world()
    runs = {"straight": straight, "resumed": resumed, "round_robin": round_robin}
    names = {k: all_gather_objects([r["dataset"] for r in t.record]) for k, t in runs.items()}
    shards = {k: all_gather_objects([r["shard"] for r in t.record]) for k, t in runs.items()}
    if rank != 0:
        return

    texts = {name: {column: [PROMPTS[name].get(column, "") + t if isinstance(PROMPTS[name], dict)
                             else PROMPTS[name] + t for t in part[column]] for column in part.column_names}
             for name, part in datasets(SIZES).items()}
    report = {"datasets": {k: v[0] for k, v in names.items()},
              "same_dataset_on_every_rank": all(len(set(map(tuple, v))) == 1 for v in names.values()),
              "shards_in_their_dataset": True, "rows_per_rank": [], "steps": []}
    for run, trained in runs.items():
        for step, record in enumerate(trained.record):
            dataset = record["dataset"]
            per_rank = [shards[run][r][step] for r in range(size)]
            report["rows_per_rank"].append([len(next(iter(s.values()))) for s in per_rank])
            for s in per_rank:  # every column of every rank's share is that dataset's prompted text
                if list(s) != list(texts[dataset]) or any(not set(s[c]) <= set(texts[dataset][c]) for c in s):
                    report["shards_in_their_dataset"] = False
            if run == "round_robin":
                continue
            report["steps"].append({"run": run, "step": record["step"], "dataset": dataset,
                                    **reference_step(args.model, record, per_rank, losses()[dataset])})
    straight_tail = [r for r in straight.record if r["step"] >= SAVE_AT]
    report["resumed_shards_equal"] = [r["shard"] for r in straight_tail] == [r["shard"] for r in resumed.record]
    report["resumed_vs_straight"] = rel(resumed.record[-1]["after"], straight.record[-1]["after"])
    report["resumed_update_vs_straight"] = rel(resumed.record[-1]["after"], straight.record[-1]["after"],
                                               straight.record[SAVE_AT - 1]["after"])
    report["logged"] = [{k: v for k, v in h.items() if k in ("loss", "step") or "/" in k}
                        for h in straight.state.log_history if "loss" in h]
    report["evaluated"] = {k: v for k, v in evaluated.items() if k.endswith("_loss")}
    report["eval_logged"] = sorted(k for h in straight.state.log_history for k in h if k.startswith("eval_"))
    report["counts"] = Counter(report["datasets"]["straight"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)


def reference_step(model_dir: str, record: dict, shards: list[dict], loss) -> dict:
    """The single-process full-batch step from ``record["before"]``, against the Trainer's ``after``."""
    from exactness_worker import reference_value, rel
    from helpers import load_model
    from reference import reference_embeddings

    from ds_contrastive.losses.guide_model import outside_zero3_init

    with outside_zero3_init():  # a load on rank 0 alone must not enter ZeRO-3's collective zero.Init
        model = load_model(model_dir)
    model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(record["before"][n])
    columns = [list(s.values()) for s in shards]
    plans = [[(list(range(sum(len(c) for c in cols))), False)] for cols in columns]  # dropout is off
    emb = reference_embeddings(model, model.tokenizer, columns, plans, SEED, 0, MAX_LEN)
    texts = [[t for cols in columns for t in cols[c]] for c in range(len(columns[0]))]
    value = reference_value(loss, emb, None, texts, torch.tensor(1.0 / loss.temperature))
    value.backward()
    want = {n: (p - LR * p.grad if p.grad is not None else p).detach() for n, p in model.named_parameters()}
    return {"loss": float(value), "vs_reference": rel(record["after"], want),
            "update_vs_reference": rel(record["after"], want, record["before"]),
            "moved": rel(record["after"], record["before"])}


if __name__ == "__main__":
    main()
    from ds_contrastive.core.runtime import shutdown

    shutdown()  # every rank leaves together, after rank 0's report
