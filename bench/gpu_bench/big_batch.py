"""The 1,048,576-row batch: made and tokenized in a background process started at the beginning of the run.

This way the 1M step is timed like a prefetched steady-state step. The spawned process (niced, on a
quarter of the cores while other items need the CPU to feed the GPU) leaves its result pickled in
/dev/shm when that has room. It runs before any engine has measured its chunk costs, so it plans
with "fill" and the ds part plans the batch again with the engine's planner and costs. If the
process fails or is absent, the texts are made in the main process and tokenized by engine.prepare,
prefetched.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

from . import GIB
from .clock import log
from .workloads import vocabulary, workload_texts


def prepare_worker(spec: dict, out_path: str) -> None:
    """Generate the big batch's texts and tokenize them with CachedStep.prepare.

    No engine exists yet, so the chunk costs are not measured: it plans with "fill" (no costs needed,
    and cheap), and the main process plans the tokens again as the engine does (CachedStep.replan).
    """
    os.environ["RAYON_NUM_THREADS"] = str(spec["threads"])
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    with contextlib.suppress(OSError):
        os.nice(10)  # the main process, which feeds the GPU, goes first
    sys.path.insert(0, spec["package_root"])
    start = time.perf_counter()
    result: dict = {"rows": spec["rows"]}
    vocab = vocabulary(Path(spec["tokenizer_dir"]))
    texts = workload_texts(vocab, spec["workload"], spec["rows"], spec["smoke"])
    batch = {"anchor": texts["anchor"], "positive": texts["positive"]}
    result.update(q_len=texts["q_len"], d_len=texts["d_len"], texts_seconds=time.perf_counter() - start)
    try:
        from transformers import AutoTokenizer

        from ds_contrastive.core.step import CachedStep
        from ds_contrastive.losses.infonce import InfoNCE

        step = CachedStep(InfoNCE(temperature=0.05), AutoTokenizer.from_pretrained(spec["tokenizer_dir"]),
                          max_length=spec["max_length"], lowercase=spec["lowercase"], chunk_tokens=spec["chunk_tokens"],
                          retain_tokens=0, planner="fill")
        t = time.perf_counter()
        prepared = step.prepare(batch)
        if getattr(prepared, "error", None):
            raise RuntimeError(prepared.error)
        result.update(prepared=prepared, prepare_seconds=time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - the engine prepares the raw texts then
        result.update(batch=batch, error=f"{type(e).__name__}: {e}")
    result["seconds"] = time.perf_counter() - start
    with open(out_path + ".tmp", "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(out_path + ".tmp", out_path)


def scratch_folder(workdir: Path, smoke: bool) -> Path:
    """Where the pickled batch goes: /dev/shm when it has room (16 GiB; 1 GiB in smoke mode), else ``workdir``."""
    shm = Path("/dev/shm")
    room = shutil.disk_usage(shm).free if shm.is_dir() else 0
    return shm if room > 16 * GIB or (smoke and room > GIB) else workdir


class BigBatchWorker:
    """The background process running :func:`prepare_worker`, and the pickle it writes."""

    def __init__(self) -> None:
        self.process = None
        self.path: str | None = None

    def start(self, spec: dict, folder: Path) -> None:
        """Start :func:`prepare_worker` on ``spec``; it writes its pickle into ``folder``."""
        import multiprocessing as mp

        self.path = str(folder / f"ds_contrastive_bench_{os.getpid()}_1m.pkl")
        self.process = mp.get_context("spawn").Process(target=prepare_worker, args=(spec, self.path), daemon=True)
        self.process.start()
        log(f"background process {self.process.pid} prepares the {spec['rows']}-row batch into {self.path}")

    def collect(self, timeout: float) -> dict | None:
        """Wait up to ``timeout`` seconds for the process, then load and delete its pickle (None: none written)."""
        if self.process is None:
            return None
        self.process.join(timeout=timeout)
        if not Path(self.path).exists():
            return None
        with open(self.path, "rb") as f:
            result = pickle.load(f)
        os.unlink(self.path)
        return result

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
        if self.path and Path(self.path).exists():
            os.unlink(self.path)


def big_input(worker: BigBatchWorker, item: dict, vocab: list[str], smoke: bool, budget_left: float) -> dict:
    """The 1M batch (``input``, and its drawn ``q_len``, ``d_len``): from the background process, or made here.

    ``input`` is the process's Prepared batch, or raw texts when it failed (then engine.prepare
    tokenizes them, prefetched). How long the wait took and what the process reported go into
    ``item["big_batch"]``.
    """
    out: dict = {}
    t = time.perf_counter()
    result = worker.collect(timeout=max(1.0, budget_left))
    wait = time.perf_counter() - t
    info = {"wait_and_load_seconds": wait}
    if result is None:
        info["worker"] = "failed or absent: texts made here, tokenized by engine.prepare"
        texts = workload_texts(vocab, item["workload"], item["rows"], smoke)
        out.update(input={"anchor": texts["anchor"], "positive": texts["positive"]}, q_len=texts["q_len"],
                   d_len=texts["d_len"])
    else:
        info.update({k: result.get(k) for k in ("texts_seconds", "prepare_seconds", "seconds", "error")})
        out.update(input=result["prepared"] if "prepared" in result else result["batch"], q_len=result["q_len"],
                   d_len=result["d_len"])
    item["big_batch"] = info
    log(f"  1M batch ready: {info}")
    return out
