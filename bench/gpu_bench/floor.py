"""The floor: what the encoder alone costs on exactly the chunks ds_contrastive fed it in its last timed step.

A no-grad forward plus a forward/backward of every chunk of the engine's own plan (its tokens and
engine.last_plan: same sequences, same padding) on a plain copy of the model outside DeepSpeed, so
that the ds step over the floor is the engine's overhead. With retained graphs the engine skips the
pass-2 forward of the kept chunks, so the no-grad forwards are timed one by one (cumulatively) and
the ratios can subtract those of the kept chunks. Large plans are sampled: every k-th chunk of the
length-sorted plan is timed and the time scaled by padded tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from .models import load_st

if TYPE_CHECKING:
    from ds_contrastive.core.chunks import ChunkPlan

    from .device import Device


def floor_sampling(nominal_rows: int, chunks: int) -> int:
    """Every how many chunks the floor times: all at 16,384 rows, 1 in 4 at 65,536, ~40 chunks at 1M.

    The timed chunks are spread over the length-sorted plan and the time is scaled by padded
    tokens (total / timed), so the fixed workload's floor is exact up to its last partial chunk.
    """
    if nominal_rows <= 16384:
        return 1
    return max(1, chunks // 40) if nominal_rows > 200_000 else 4


def floor_part(dev: Device, model_dir: Path, bf16: bool, tokens, plan: ChunkPlan, sample_every: int = 1) -> dict:
    """No-grad forward + forward/backward of the engine's chunks on a plain bf16 copy of the model.

    ``tokens`` and ``plan`` are what the ds part's last timed step fed the encoder (its Prepared
    tokens and engine.last_plan), so the floor is of the very chunks the engine ran.
    """
    torch = dev.torch
    model = load_st(model_dir, dev.type)
    if bf16:
        model = model.to(torch.bfloat16)
    model.train()
    real = [c for c in plan.chunks if not c.dummy]
    chosen = real[::sample_every]
    lengths = tokens.lengths
    padded_all = [len(c.indices) * max(lengths[i] for i in c.indices) for c in real]
    sizes = padded_all[::sample_every]
    feats = [tokens.features(c.indices, torch.device(dev.type)) for c in chosen]
    # warm-up on the first (longest) chunk: kernels and the allocator
    model(dict(feats[0]))["sentence_embedding"].float().sum().backward()
    with torch.no_grad():
        model(dict(feats[0]))
    model.zero_grad(set_to_none=True)
    # timed: every no-grad forward (one mark per chunk), then every forward/backward
    marks = []
    dev.sync()
    start = time.perf_counter()
    if dev.cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(feats) + 1)]
        events[0].record()
    with torch.no_grad():
        for k, f in enumerate(feats):
            model(dict(f))
            if dev.cuda:
                events[k + 1].record()
            else:
                marks.append(time.perf_counter() - start)
    for f in feats:
        model(dict(f))["sentence_embedding"].float().sum().backward()
    dev.sync()
    total = time.perf_counter() - start
    if dev.cuda:
        marks = [events[0].elapsed_time(e) / 1000 for e in events[1:]]
    nograd = marks[-1]
    scale = sum(padded_all) / sum(sizes)
    del model, feats
    dev.cleanup()
    return {"seconds": total * scale, "nograd_seconds": nograd * scale, "fwdbwd_seconds": (total - nograd) * scale,
            "nograd_cumulative": marks if sample_every == 1 else None, "chunks": len(real),
            "sampled_every": sample_every, "measured_chunks": len(chosen), "scale": scale,
            "padded_tokens": int(sum(padded_all)), "real_tokens": int(sum(lengths)),
            "plan": "the ds part's engine.last_plan and tokens",
            "precision": "bf16 weights" if bf16 else "fp32"}
