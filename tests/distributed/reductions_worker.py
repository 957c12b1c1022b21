"""Worker for tests/test_reductions.py: count gradient collectives and forward calls per step.

Every reduction DeepSpeed issues goes through ``deepspeed.comm``'s backend
object; we wrap its reducing methods and attribute each call to the pass-2
backward call (or the optimizer step) it happened in.
"""

import deepspeed.comm.comm as ds_comm
from helpers import corpus, load_model, worker_main

import ds_contrastive as dc
from ds_contrastive.core.collectives import all_gather_objects
from ds_contrastive.core.runtime import world

REDUCING = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_reduce_coalesced", "reduce",
            "inference_all_reduce", "reduce_scatter_fn")


class Counter:
    def __init__(self) -> None:
        self.phase = None
        self.events: list[tuple[str, int]] = []

    def install(self, backend) -> None:
        for name in REDUCING:
            original = getattr(backend, name, None)
            if original is None:
                continue

            def wrapped(*args, __original=original, __name=name, **kwargs):
                if self.phase is not None:
                    tensor = args[0] if args else next(iter(kwargs.values()))
                    numel = tensor.numel() if hasattr(tensor, "numel") else -1
                    self.events.append((self.phase, __name, numel))
                return __original(*args, **kwargs)

            setattr(backend, name, wrapped)


def measure(model_dir: str, stage: int, chunk_rows: int) -> dict:
    rank, size = world()
    cfg = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 10**8, "allgather_bucket_size": 10**8},
           "gradient_clipping": 0.0}
    engine = dc.ContrastiveEngine(load_model(model_dir), dc.InfoNCE(), ds_config=cfg, chunk_tokens=None,
                                  chunk_rows=chunk_rows)
    counter = Counter()
    counter.install(ds_comm.cdb)
    forwards = []
    engine.module.model.register_forward_hook(lambda *a: forwards.append(1))
    backward, step = engine.engine.backward, engine.engine.step
    calls = {"backward": 0}

    def counted_backward(*a, **k):
        counter.phase = f"backward{calls['backward']}"
        calls["backward"] += 1
        try:
            return backward(*a, **k)
        finally:
            counter.phase = "between"

    def counted_step(*a, **k):
        counter.phase = "step"
        try:
            return step(*a, **k)
        finally:
            counter.phase = None

    engine.engine.backward, engine.engine.step = counted_backward, counted_step
    sizes = [7, 5, 4][:size]
    batch = corpus(sum(sizes), 1, seed=3)
    start = sum(sizes[:rank])
    metrics = engine.train_step({k: v[start : start + sizes[rank]] for k, v in batch.items()})
    return {
        "chunks": len(engine.last_plan),
        "backward_calls": calls["backward"],
        "events": counter.events,
        "forward_calls_per_rank": all_gather_objects(len(forwards)),
        "kept_chunks": int(metrics["kept_chunks"]),
    }


if __name__ == "__main__":
    worker_main(lambda args: {f"zero{stage}/rows{rows}": measure(args.model, stage, rows)
                              for stage in (0, 1, 2, 3) for rows in (1000, 3)})
