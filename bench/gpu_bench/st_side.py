"""The sentence-transformers side: CachedMultipleNegativesRankingLoss called directly, its mini-batch tuned per item.

Features are tokenized outside the timed region the way its data collator does (each column padded
to its longest, ``model.preprocess``), and ``model.forward`` runs under torch.autocast(bf16) as the HF
Trainer does under bf16 (fp32 master weights). The mini-batch is the largest of ST_MINI_BATCHES whose
probe (one forward/backward of one mini-batch at the column's padded width, after the AdamW state
exists) peaks under 90% of the GPU's memory, or, when none does, the largest below that range that
fits (recorded as below the tuned range); a full step that still runs out of memory halves it and
runs again.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import GIB
from .clock import log
from .device import is_oom
from .models import load_st

if TYPE_CHECKING:
    from .device import Device, SimulatedOOM

ST_MINI_BATCHES = (4096, 2048, 1024, 512)
SMOKE_ST_MINI_BATCHES = (16, 8, 4, 2)


def collate_columns(model, texts: dict) -> list[dict]:
    """The anchor and positive columns tokenized as sentence-transformers' collator does: padded to their longest."""
    fn = getattr(model, "preprocess", None) or model.tokenize
    cols = []
    for name in ("anchor", "positive"):
        f = fn(texts[name])
        cols.append({k: v for k, v in f.items() if hasattr(v, "shape")})
    return cols


def st_part(dev: Device, simulated: SimulatedOOM, model_dir: Path, features: Callable[[Any], list[dict]], *,
            workload: str, rows: int, steps: int, bf16: bool, smoke: bool) -> dict:
    """Tune the mini-batch, warm up on an eighth of the batch (at least a mini-batch), time ``steps`` full steps.

    ``features(model)`` gives the two columns' features (see :func:`collate_columns`). In smoke mode
    ``simulated`` fails the first probe and, for the realistic workload, the first full step, so
    that both fallbacks run.
    """
    torch = dev.torch
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:
        from sentence_transformers import losses

    model = load_st(model_dir, dev.type)
    model.train()
    cols = features(model)
    model.forward = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)(model.forward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # the AdamW state exists before probing (its memory counts): one step with zero gradients
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    q, d = ({k: v.to(dev.type) for k, v in c.items()} for c in cols)
    labels = torch.zeros(rows, device=dev.type)
    wide = d if d["input_ids"].shape[1] >= q["input_ids"].shape[1] else q
    candidates = SMOKE_ST_MINI_BATCHES if smoke else ST_MINI_BATCHES
    result = {"probes": [], "attempts": [], "widths": [q["input_ids"].shape[1], d["input_ids"].shape[1]],
              "st_has_mini_batch_num_tokens": "mini_batch_num_tokens" in inspect.signature(
                  losses.CachedMultipleNegativesRankingLoss.__init__).parameters}
    # probe the tuned range, then below it (halving) if nothing there fits
    floor_mbs = 2 if smoke else 64
    probes = list(candidates)
    while probes[-1] // 2 >= floor_mbs:
        probes.append(probes[-1] // 2)
    mbs = None
    for m in probes:
        ok, peak = st_probe(dev, simulated, model, wide, min(m, rows), smoke)
        result["probes"].append({"mini_batch": m, "fits": ok, "peak_gib": peak})
        if ok:
            mbs = m
            break
    if mbs is None:
        raise torch.cuda.OutOfMemoryError(f"no mini-batch of {probes} fits one forward/backward")

    def step(loss_fn, qf, df, lab):
        value = loss_fn([dict(qf), dict(df)], lab)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    while True:
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mbs)
        attempt = {"mini_batch": mbs}
        failure = None
        try:
            warm = min(rows, max(mbs, rows // 8))
            dev.sync()
            t = time.perf_counter()
            step(loss, {k: v[:warm] for k, v in q.items()}, {k: v[:warm] for k, v in d.items()}, labels[:warm])
            dev.sync()
            attempt["warmup"] = {"rows": warm, "seconds": time.perf_counter() - t}
            times = []
            for _ in range(steps):
                dev.reset_peak()
                if workload == "realistic":
                    simulated.maybe("st-step")
                dev.sync()
                t = time.perf_counter()
                step(loss, q, d, labels)
                dev.sync()
                times.append(time.perf_counter() - t)
                log(f"  ST step (mini-batch {mbs}): {times[-1]:.3f} s, peak {dev.peak_gib():.2f} GiB")
        except Exception as e:
            if not is_oom(e):
                raise
            failure = str(e)[:300]
        if failure is None:
            attempt.update(ok=True, step_seconds=times)
            result["attempts"].append(attempt)
            break
        # out of memory: free it here, outside the except block (its traceback holds activations)
        attempt.update(ok=False, error=failure)
        result["attempts"].append(attempt)
        log(f"  ST mini-batch {mbs}: out of memory in the full step; halving")
        opt.zero_grad(set_to_none=True)
        loss = None
        dev.cleanup()
        if mbs // 2 < floor_mbs:
            raise RuntimeError(f"out of memory down to mini-batch {mbs}: {failure}")
        mbs //= 2
    result.update(mini_batch=mbs, below_tuned_range=mbs < candidates[-1], step_seconds=statistics.median(times),
                  peak_gib=dev.peak_gib(), st_steps=times)
    result["padded_tokens"] = {"untrimmed": int(rows * sum(result["widths"])),
                               "trimmed_per_mini_batch": st_trimmed_tokens(q, d, mbs)}
    model = opt = loss = q = d = labels = wide = None
    dev.cleanup()
    result["allocated_after_gib"] = dev.allocated_gib()
    return result


def st_probe(dev: Device, simulated: SimulatedOOM, model, wide: dict, m: int, smoke: bool
             ) -> tuple[bool, float | None]:
    """One forward/backward of ``m`` rows at the column's full padded width; fits under 90% of memory?"""
    dev.cleanup()
    dev.reset_peak()
    failed = False
    try:
        if smoke and m == SMOKE_ST_MINI_BATCHES[0]:
            simulated.maybe("st-probe")
        f = {k: v[:m] for k, v in wide.items()}
        model(dict(f))["sentence_embedding"].float().sum().backward()
        dev.sync()
    except Exception as e:
        if not is_oom(e):
            raise
        failed = True
    f = None
    model.zero_grad(set_to_none=True)
    peak = None if failed else dev.peak_gib()
    dev.cleanup()
    if failed:
        return False, None
    return (peak * GIB <= 0.90 * dev.total_mem) if dev.cuda else True, peak


def st_trimmed_tokens(q: dict, d: dict, mbs: int) -> int:
    """Padded tokens CachedMNRL embeds when each mini-batch drops its trailing padding columns (ST >= 6.1)."""
    total = 0
    for col in (q, d):
        lengths = col["attention_mask"].sum(dim=1)
        for b in range(0, len(lengths), mbs):
            part = lengths[b:b + mbs]
            total += int(part.max()) * len(part)
    return total
