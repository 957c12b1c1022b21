"""The ds_contrastive side: a ContrastiveEngine with the library's defaults, warmed up, then timed step by step.

The engine gets the repository's configs/deepspeed/zero{2,3}.json (bf16 as the run's precision,
gradient clipping off), torch AdamW, and otherwise the library's planner and retain_tokens, so that
the run measures what users get. Steps are fed through prefetched(engine.prepare, ...) so that
preparing step i+1 overlaps step i and the timed steps are steady-state steps; the 1,048,576-row
batch comes tokenized from a background process instead and is only planned again here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import ROOT
from .clock import log
from .workloads import check_lengths

if TYPE_CHECKING:
    from ds_contrastive.core.step import Prepared

    from .device import Device, SimulatedOOM


def ds_config(stage: int, bf16: bool) -> dict:
    """The repository's ZeRO config for ``stage``, with the run's precision and no gradient clipping."""
    config = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    config["bf16"] = {"enabled": bf16}
    config["gradient_clipping"] = 0.0
    return config


def ds_part(dev: Device, load_encoder: Callable[[], Any], engine_built: Callable[[], None], *, stage: int,
            retain: int | str, planner: str, chunk_tokens: int, tile_elements: int | None, bf16: bool,
            warm: dict, full: dict | Prepared, drawn: dict, steps: int, simulated: SimulatedOOM | None
            ) -> tuple[dict, tuple]:
    """Build an engine with the library's planner, warm up on ``warm``, time ``steps`` steps of ``full``.

    Returns the part's record and what the last timed step fed the encoder, (its tokens,
    engine.last_plan), which the floor then repeats. ``load_encoder`` makes the model (built on first
    use): init_seconds counts it, and the engine's probe of the chunk costs unless its on-disk cache
    has them; ``engine_built`` is called once the engine exists. ``full`` is raw texts, or the big
    batch Prepared by the background process; ``drawn`` holds the full batch's drawn lengths (q_len,
    d_len), which the engine's tokens must match. ``simulated`` (smoke mode) fails the first timed
    step with kept graphs, so that the caller's retry without them runs.
    """
    import ds_contrastive as dc
    from ds_contrastive.core.prefetch import prefetched
    from ds_contrastive.core.step import Prepared

    loss_kwargs = {"temperature": 0.05}
    if tile_elements:
        loss_kwargs["tile_elements"] = tile_elements
    t = time.perf_counter()
    engine = dc.ContrastiveEngine(load_encoder(), loss=dc.InfoNCE(**loss_kwargs), ds_config=ds_config(stage, bf16),
                                  chunk_tokens=chunk_tokens, retain_tokens=retain, planner=planner, lr=1e-5,
                                  weight_decay=0.01, seed=0)
    engine_built()
    step = engine.step
    costs, calibration = step.costs, step.calibration
    warm_rows = len(warm["anchor"])
    result = {"zero_stage": stage, "chunk_tokens": step.chunk_tokens, "planner": step.planner,
              "chunk_costs": dataclasses.asdict(costs) if costs else None, "retain_tokens": retain,
              "retain_memory_fraction": step.retain_memory_fraction if retain == "auto" else None,
              "calibration": calibration.to_json() if calibration else None,
              # the engine's probe of the chunk costs runs here, unless its on-disk cache has them
              "init_seconds": time.perf_counter() - t, "warmup_rows": warm_rows, "steps": []}
    if isinstance(full, Prepared):
        t = time.perf_counter()
        full = step.replan(full)
        result["replan_seconds"] = time.perf_counter() - t
        source = iter([warm] + [full] * steps)
        result["fed"] = "tokenized in a background process, planned again with the engine's planner and costs"
    else:
        prepare_seconds: list[float] = []

        def prepare(batch: dict) -> Prepared:
            t = time.perf_counter()
            out = engine.prepare(batch)
            prepare_seconds.append(time.perf_counter() - t)
            return out

        source = prefetched(prepare, [warm] + [full] * steps, depth=1)
        result["fed"] = "prefetched(engine.prepare, depth=1)"
        result["background_prepare_seconds"] = prepare_seconds
    fed = None
    try:
        for i in range(steps + 1):
            w = time.perf_counter()
            batch = next(source)
            wait = time.perf_counter() - w
            if i == 1:
                dev.sync()
                dev.reset_peak()
                if simulated is not None and retain != 0:
                    simulated.maybe("ds-retain")
            dev.sync()
            start = time.perf_counter()
            metrics = engine.train_step(batch)
            dev.sync()
            seconds = time.perf_counter() - start
            if i == steps:  # the last timed step: the floor repeats its chunks
                fed = (batch.tokens, engine.last_plan)
            del batch
            keep = {k: float(v) for k, v in metrics.items() if k.startswith("time_") or k in (
                "chunks", "kept_chunks", "padding_fraction", "peak_memory_gb", "loss", "accuracy",
                "global_batch_size")}
            entry = {"seconds": seconds, "prefetch_wait_seconds": wait, **keep}
            if i == 0:
                result["warmup"] = entry
                log(f"  ds warm-up {warm_rows} rows: {seconds:.2f} s")
            else:
                result["steps"].append(entry)
                log(f"  ds step {i}: {seconds:.3f} s, chunks {keep.get('chunks')}, kept {keep.get('kept_chunks')}, "
                    f"padding {keep.get('padding_fraction', 0):.1%}, waited {wait:.2f} s for its input, "
                    f"peak {dev.peak_gib():.2f} GiB")
        check_lengths(fed[0], drawn["q_len"], drawn["d_len"])
        timed = result["steps"]
        result.update(step_seconds=statistics.median(s["seconds"] for s in timed), peak_gib=dev.peak_gib(),
                      chunks=timed[-1]["chunks"], kept_chunks=timed[-1]["kept_chunks"],
                      padding_fraction=timed[-1]["padding_fraction"])
    finally:
        # free the engine here, also on failure: a traceback kept by the caller must not hold it
        if hasattr(source, "close"):
            with contextlib.suppress(Exception):
                source.close()
        with contextlib.suppress(Exception):
            engine.engine.destroy()
        engine = step = source = full = None
        dev.cleanup()
    result["allocated_after_gib"] = dev.allocated_gib()
    return result, fed
