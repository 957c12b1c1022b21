"""The run: a Bench holds the settings, the models and inputs made so far and the report, and runs the plan.

Per item the parts run in order: ds_contrastive, the floor on the chunks of its last timed step, then
sentence-transformers, after dropping what the budget no longer fits (ST first, then the floor; no
ds part, no item). A part that fails or runs out of memory is recorded, its memory freed outside the
except block (the traceback holds it), and the run goes on; a ds part out of memory with kept graphs
runs again with retain_tokens=0. The report is saved after every part.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time
import traceback
from pathlib import Path

from . import GIB
from .big_batch import BigBatchWorker, big_input, scratch_folder
from .budget import CARD_FACTOR, Budget
from .clock import log
from .device import Device, SimulatedOOM, is_oom
from .ds_side import ds_part
from .environment import card_slug, init_single_process, software
from .floor import floor_part, floor_sampling
from .models import SHAPES, SMOKE_SHAPES, build_model_dir, load_st
from .plan import RESTRICTIONS, Item
from .ratios import ratios
from .report import out_paths, write_report
from .sizes import chunk_tokens_cap, scaled_rows, tile_elements, warm_rows
from .st_side import SMOKE_ST_MINI_BATCHES, ST_MINI_BATCHES, collate_columns, st_part
from .workloads import find_tokenizer_dir, vocabulary, workload_texts


class Bench:
    """One run of the plan, from the parsed command line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.dev = Device(args.cpu)
        self.card = args.card or (card_slug(self.dev.name) if self.dev.cuda else "cpu")
        seconds = args.budget if args.budget is not None else (900.0 if self.smoke else 430.0)
        self.budget = Budget(seconds, CARD_FACTOR.get(self.card, 2.0 if self.dev.cuda else 1.0), self.smoke,
                             self.dev.cuda, args.steps)
        self.shapes = SMOKE_SHAPES if self.smoke else SHAPES
        self.simulated = SimulatedOOM(self.smoke and not args.no_simulated_oom)
        # bf16 on a GPU; fp32 on a CPU (bf16 matmuls are emulated there and make the smoke run 5x slower)
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and self.dev.cuda)
        if args.tf32:
            self.dev.torch.backends.cuda.matmul.allow_tf32 = True
        self.json_path, self.md_path = out_paths(args.out, self.card, self.smoke)
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.texts: dict = {}
        self.st_feats: dict = {}
        self.model_dirs: dict = {}
        self.worker = BigBatchWorker()
        self.report: dict = {}
        self.tokenizer_dir: Path | None = None  # set by setup()
        self.vocab: list[str] = []  # set by setup()

    def chunk_tokens(self, shape: str) -> int:
        return chunk_tokens_cap(shape, self.args.chunk_tokens, self.smoke, self.dev.total_mem)

    # -- models and inputs, made once per run -----------------------------------------------------------------

    def get_texts(self, workload: str, rows: int) -> dict:
        key = (workload, rows)
        if key not in self.texts:
            t = time.perf_counter()
            self.texts[key] = workload_texts(self.vocab, workload, rows, self.smoke)
            log(f"texts {workload} x {rows}: {time.perf_counter() - t:.1f} s")
        return self.texts[key]

    def get_st_features(self, model, workload: str, rows: int) -> list[dict]:
        """Each column tokenized as sentence-transformers' collator does: padded to its longest."""
        key = (workload, rows)
        if key not in self.st_feats:
            texts = self.get_texts(workload, rows)
            t = time.perf_counter()
            cols = self.st_feats[key] = collate_columns(model, texts)
            log(f"ST pre-tokenized {workload} x {rows}: {time.perf_counter() - t:.1f} s "
                f"(widths {[c['input_ids'].shape[1] for c in cols]})")
        return self.st_feats[key]

    def model_dir(self, shape: str) -> Path:
        if shape not in self.model_dirs:
            t = time.perf_counter()
            self.model_dirs[shape] = build_model_dir(self.workdir / ("smoke" if self.smoke else "models"), shape,
                                                     self.shapes[shape], self.tokenizer_dir)
            log(f"model {shape} {self.shapes[shape]} at {self.model_dirs[shape]} ({time.perf_counter() - t:.1f} s)")
        return self.model_dirs[shape]

    # -- the parts -----------------------------------------------------------------------------------------------

    def run_ds(self, shape: str, workload: str, rows: int, stage: int, retain: int | str, steps: int,
               big: dict | None = None) -> tuple[dict, tuple]:
        """The ds part on the item's texts, or on the 1M batch ``big`` (warmed up on the fixed 16,384-row texts)."""
        texts = self.get_texts("fixed", scaled_rows(16384, self.smoke)) if big else self.get_texts(workload, rows)
        warm = min(warm_rows(rows, self.smoke), len(texts["anchor"]))
        return ds_part(self.dev, lambda: load_st(self.model_dir(shape), "cpu"),
                       lambda: self.budget.probed.add((shape, stage)), stage=stage, retain=retain,
                       planner=self.args.planner, chunk_tokens=self.chunk_tokens(shape),
                       tile_elements=tile_elements(self.smoke), bf16=self.bf16,
                       warm={"anchor": texts["anchor"][:warm], "positive": texts["positive"][:warm]},
                       full=big["input"] if big else {"anchor": texts["anchor"], "positive": texts["positive"]},
                       drawn=big if big else texts, steps=steps, simulated=None if big else self.simulated)

    def run_item(self, name: str, workload: str, shape: str, nominal_rows: int, parts: tuple) -> dict:
        rows = scaled_rows(nominal_rows, self.smoke)
        item = {"name": name, "workload": workload, "shape": shape, "rows": rows, "nominal_rows": nominal_rows,
                "parts": {}, "status": "started"}
        self.report["items"].append(item)
        estimates = {p: self.budget.part_estimate(p, shape, workload, rows) for p in parts}
        item["estimates_s"] = estimates
        # drop parts that do not fit: ST first, then the floor; no ds part, no item
        chosen = list(parts)
        for drop in ("st", "floor"):
            if not self.budget.fits(sum(estimates[p] for p in chosen)) and drop in chosen and len(chosen) > 1:
                chosen.remove(drop)
                item["parts"][drop] = {"status": "skipped", "reason": "budget"}
        if not self.budget.fits(sum(estimates[p] for p in chosen)):
            item["status"] = "skipped"
            needs = sum(estimates[p] for p in chosen)
            item["reason"] = f"budget: needs ~{needs:.0f} s, {self.budget.left():.0f} s left"
            log(f"skip {name}: {item['reason']}")
            self.save()
            return item
        log(f"item {name} ({workload}, {shape}, {rows} rows): parts {chosen}, estimates "
            + ", ".join(f"{p} {estimates[p]:.0f} s" for p in chosen))
        big = None
        if nominal_rows > 200_000:
            big = big_input(self.worker, item, self.vocab, self.smoke, self.budget.left())
        fed = None  # (tokens, plan) of the ds part's last timed step: the floor repeats exactly those chunks
        for part in chosen:
            t = time.perf_counter()
            failure = None
            try:
                if part == "floor":
                    if fed is None:
                        item["parts"]["floor"] = {"status": "skipped", "reason": "no ds part ran, so there is no "
                                                  "engine plan to repeat"}
                        continue
                    tokens, plan = fed
                    every = floor_sampling(nominal_rows, len(plan))
                    item["parts"]["floor"] = floor_part(self.dev, self.model_dir(shape), self.bf16, tokens, plan, every)
                    f = item["parts"]["floor"]
                    log(f"  floor: {f['seconds']:.3f} s (no-grad {f['nograd_seconds']:.3f} s, fwd/bwd "
                        f"{f['fwdbwd_seconds']:.3f} s, {f['chunks']} chunks, sampled every {every})")
                elif part.startswith("ds"):
                    stage, retain = int(part[2]), self.args.retain
                    steps = self.budget.steps_for(self.budget.step_estimate(part, shape, workload, rows), shape)
                    res, first = None, None
                    try:
                        res, fed = self.run_ds(shape, workload, rows, stage, retain, steps, big)
                    except Exception as e:
                        if retain == 0 or not is_oom(e) or not self.budget.fits(estimates[part]):
                            raise
                        first = {"retain_tokens": retain, "error": f"{type(e).__name__}: {str(e)[:500]}"}
                    if res is None:  # out of memory with kept graphs: again without, outside the except block
                        log(f"  ds with retain_tokens={retain} ran out of memory ({first['error'][:200]}); "
                            "retrying with 0")
                        self.dev.cleanup()
                        res, fed = self.run_ds(shape, workload, rows, stage, 0, steps, big)
                        res["first_attempt"] = first
                    item["parts"][part] = res
                else:
                    steps = self.budget.steps_for(self.budget.step_estimate("st", shape, workload, rows), shape)
                    item["parts"]["st"] = st_part(self.dev, self.simulated, self.model_dir(shape),
                                                  lambda model: self.get_st_features(model, workload, rows),
                                                  workload=workload, rows=rows, steps=steps, bf16=self.bf16,
                                                  smoke=self.smoke)
                item["parts"][part]["status"] = "done"
                self.budget.record(estimates[part], time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                oom = is_oom(e)
                failure = {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e)[:800]}",
                           "traceback": None if oom else traceback.format_exc()[-3000:]}
            if failure is not None:  # recorded and freed outside the except block, then on to the next part
                item["parts"][part] = failure
                log(f"  {part} {'OUT OF MEMORY' if failure['status'] == 'oom' else 'FAILED'}: {failure['error'][:300]}")
                self.dev.cleanup()
            item["parts"][part]["seconds_spent"] = time.perf_counter() - t
            item["ratios"] = ratios(item)
            self.save()
        item["status"] = "done" if all(item["parts"].get(p, {}).get("status") == "done" for p in chosen) else "partial"
        if big is not None:
            big.clear()
            self.dev.cleanup()
        item["ratios"] = ratios(item)
        self.save()
        return item

    # -- the run ---------------------------------------------------------------------------------------------------

    def save(self) -> None:
        write_report(self.report, self.card, self.json_path, self.md_path)

    def setup(self) -> None:
        """Process setup, the tokenizer and its vocabulary, and the report's header (environment and settings)."""
        init_single_process()
        from ds_contrastive.core.calibration import cache_path

        self.tokenizer_dir = find_tokenizer_dir(self.args.tokenizer)
        self.vocab = vocabulary(self.tokenizer_dir)
        self.report = {
            "schema": 2,
            "script": "bench/gpu_throughput.py",
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "smoke": self.smoke,
            "card": self.card,
            "device": self.dev.name,
            "device_memory_gib": self.dev.total_mem / GIB,
            "env": software(),
            "settings": {
                "budget_s": self.budget.seconds, "precision": "bf16" if self.bf16 else "fp32",
                "tf32_matmul": bool(self.args.tf32), "retain_tokens": self.args.retain, "planner": self.args.planner,
                "chunk_tokens_cap": {s: self.chunk_tokens(s) for s in self.shapes},
                "chunk_cost_cache": str(cache_path()),
                "loss": {"temperature": 0.05, "tile_elements": tile_elements(self.smoke) or "default"},
                "optimizer": "torch.optim.AdamW(lr=1e-5, weight_decay=0.01), both sides; gradient clipping off",
                "st_mini_batch_candidates": list(SMOKE_ST_MINI_BATCHES if self.smoke else ST_MINI_BATCHES),
                "shapes": self.shapes, "tokenizer": str(self.tokenizer_dir), "vocabulary_words": len(self.vocab),
                "workloads": {"fixed": "queries 32 tokens, documents 128 tokens",
                              "realistic": "queries uniform [6, 64] (torch seed 11); documents log-normal median 90, "
                                           "sigma 0.7, clipped [16, 512] (torch seed 12); words numpy seed 1000+rows"},
                "card_factor": self.budget.factor,
            },
            "restrictions": RESTRICTIONS,
            "items": [],
        }
        log(f"{self.dev.name} ({self.dev.total_mem / GIB:.0f} GiB), card {self.card}, "
            f"budget {self.budget.seconds:.0f} s, planner {self.args.planner}, retain_tokens {self.args.retain}, "
            f"ds_contrastive from {self.report['env']['ds_contrastive_path']}")

    def start_worker(self, plan: list[Item]) -> None:
        """Start preparing the 1M batch in a background process (its texts and tokens; see big_batch.prepare_worker)."""
        big = [p for p in plan if p[3] > 200_000]
        if not big or self.args.no_worker:
            return
        _, workload, shape, rows, _ = big[0]
        model_dir = self.model_dir(shape)
        settings = json.loads((model_dir / "sentence_bert_config.json").read_text())
        spec = {"rows": scaled_rows(rows, self.smoke), "workload": workload, "smoke": self.smoke,
                "tokenizer_dir": str(model_dir), "max_length": int(settings.get("max_seq_length") or 512),
                "lowercase": bool(settings.get("do_lower_case")),
                "chunk_tokens": self.chunk_tokens(shape), "package_root": str(self.args.package_root),
                # a quarter of the cores while other items run (they need the CPU to feed the GPU); all of
                # them when the big batch is the first thing the run needs
                "threads": (os.cpu_count() or 2) if plan[0][3] > 200_000 else max(1, (os.cpu_count() or 2) // 4)}
        self.worker.start(spec, scratch_folder(self.workdir, self.smoke))

    def run(self, plan: list[Item]) -> None:
        self.setup()
        self.start_worker(plan)
        self.save()
        try:
            for entry in plan:
                self.run_item(*entry)
        finally:
            self.worker.stop()
            self.report["finished"] = True
            self.save()
        log(f"wrote {self.json_path} and {self.md_path}")
        print("\n" + self.report["table_markdown"], flush=True)
