"""Worker for tests/test_bad_input.py: bad batches on one rank raise a clear error on every rank."""

from helpers import corpus, load_model, worker_main

import ds_contrastive as dc
from ds_contrastive.core.collectives import all_gather_objects
from ds_contrastive.core.runtime import world
from ds_contrastive.run.setup import check_same_data

CFG = {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.0}


def bad_shards(good: dict) -> dict[str, dict]:
    """Each case spoils rank 1's shard only; rank 0 keeps a good one."""
    n = len(good["anchor"])
    return {
        "empty_batch": {k: [] for k in good},
        "missing_column": {k: v for k, v in good.items() if k != "negative_0"},
        "different_lengths": {**good, "positive": good["positive"][:-1]},
        "empty_string": {**good, "anchor": good["anchor"][:-1] + [""]},
        "non_string": {**good, "positive": [None] + good["positive"][1:]},
        "not_a_mapping": [good["anchor"]] * n,
        "string_column": {**good, "anchor": "a single string"},
    }


def build(args) -> list[dict]:
    rank, size = world()
    result = {}
    for name, cfg in {
        "gas_4": {**CFG, "gradient_accumulation_steps": 4},
        "fp16": {**CFG, "fp16": {"enabled": True}},
        "zero_4": {**CFG, "zero_optimization": {"stage": 4}},
        "micro_batch_8": {**CFG, "train_micro_batch_size_per_gpu": 8},
    }.items():
        try:
            dc.ContrastiveEngine(load_model(args.model), ds_config=cfg)
            result[name] = None
        except dc.ConfigError as e:
            result[name] = str(e)

    engine = dc.ContrastiveEngine(load_model(args.model), ds_config=CFG, chunk_tokens=200)
    good = corpus(6, 1, seed=rank)
    for name, bad in bad_shards(good).items():
        try:
            engine.train_step(bad if rank == 1 else good)
            result[name] = None
        except dc.BatchError as e:
            result[name] = str(e)
    try:  # a training file that differs between ranks (rank 1 reads one more row)
        check_same_data({"anchor": ["a text"] * (3 + rank), "positive": ["its pair"] * (3 + rank)})
        result["different_files"] = None
    except ValueError as e:
        result["different_files"] = str(e)
    result["good_after_errors"] = engine.train_step(good)["loss"]
    result["steps"] = engine.global_step
    return all_gather_objects(result)


if __name__ == "__main__":
    worker_main(build)
