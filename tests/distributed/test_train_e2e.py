"""``launch/train.py`` end to end: 2 ranks under the deepspeed launcher, W&B offline, a few steps.

The test reads the logged metrics back from the offline run file and checks
them against the README's metric table (every documented key logged and
finite, nothing logged that is not documented), compares the sharded
evaluation with a single-process one of the saved model, and loads the saved
models with ``SentenceTransformer(path)``; ZeRO-2, ZeRO-3 and ZeRO-3 with CPU
offload runs of the same job must save the same model (ZeRO-3 saves
consolidated weights).
"""

import json
import math
import re

import deepspeed
import pytest
import torch
from helpers import corpus, minilm_dir
from sentence_transformers import SentenceTransformer
from wandb_offline import config, history, records, run_file

from ds_contrastive.run.retrieval import evaluate_model
from jobs import ROOT, run_deepspeed

STEPS = 3
HELDOUT = 13  # split 6 + 7 over the two ranks
CONFIGS = {"zero2": ["--eval_every_steps", "2"], "zero3": [], "zero3_offload": [],
           "zero3_guided_matryoshka": ["--guide", str(minilm_dir()), "--matryoshka_dims", "32,16",
                                       "--matryoshka_weights", "1,0.5", "--margin", "0.02"]}
PLACES = {"<dim>": ["32", "16"], "<term>": ["anchor_doc", "anchor_anchor", "positive_positive"]}


def documented_keys() -> dict[str, list[str]]:
    """The README's metric table: {when: [key, ...]}, placeholders expanded for these runs."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Logging and outputs"):readme.index("## Checkpoints and resuming")]
    table: dict[str, list[str]] = {}
    for key, when in re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", section, re.MULTILINE):
        place = next((p for p in PLACES if p in key), None)
        table.setdefault(when, []).extend([key.replace(place, v) for v in PLACES[place]] if place else [key])
    return table


def write_jsonl(path, columns):
    with open(path, "w") as f:
        for row in zip(*columns.values()):
            f.write(json.dumps(dict(zip(columns, row))) + "\n")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_jsonl(root / "train.jsonl", corpus(40, 1, seed=11))
    write_jsonl(root / "heldout.jsonl", corpus(HELDOUT, 0, seed=12))
    out = {}
    for stage, extra in CONFIGS.items():
        out[stage] = root / stage
        run_deepspeed(ROOT / "launch/train.py", 2, [
            "--deepspeed_config", str(ROOT / f"configs/deepspeed/{stage.split('_guided')[0]}.json"), *extra,
            "--config", str(ROOT / "configs/train/quickstart.yaml"),
            "--model", str(tiny_model_dir), "--train_data", str(root / "train.jsonl"),
            "--negative_columns", "negative_0", "--eval_data", str(root / "heldout.jsonl"),
            # fixed planner costs: the plan (so the dropout masks) must not depend on each stage's measured timings
            "--global_batch_size", "9", "--max_steps", str(STEPS), "--chunk_tokens", "150",
            "--chunk_costs", "1e-3,1e-6,1e-9",
            "--max_length", "32", "--learnable_temperature", "true", "--wandb", "true",
            "--wandb_run_name", f"e2e-{stage}", "--progress_bar", "false", "--output_dir", str(out[stage]),
        ], timeout=600)
    return out


def step_rows(path):
    return [row for row in history(path) if "train/loss" in row]


@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_guided_matryoshka"])
def test_wandb_run_logs_every_documented_key_and_nothing_else(runs, stage):
    documented = documented_keys()
    assert len(documented["always"]) >= 25 and len(documented["eval"]) == 4
    expected = documented["always"] + (documented["guided"] + documented["Matryoshka"] if "guided" in stage else [])
    path = run_file(runs[stage])
    rows = step_rows(path)
    assert [row["_step"] for row in rows] == [row["train/step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        missing = [key for key in expected if not math.isfinite(row.get(key, math.nan))]
        assert not missing, (missing, row)
        undocumented = set(row) - set(expected) - set(documented["eval"]) - {"_step", "_runtime", "_timestamp",
                                                                             "train/step"}
        assert not undocumented, undocumented
        assert row["negatives/global_batch_size"] == 9
        # 9 positives + 9 hard negatives, less the positive; the guide masks some
        assert row["negatives/candidates_per_anchor"] == 17 if "guided" not in stage else (
            0 < row["negatives/candidates_per_anchor"] <= 17 + 2 * 8)
        assert 0 <= row["system/peak_memory_gb_min"] <= row["system/peak_memory_gb_max"]
        assert row["system/peak_memory_gb_max_rank"] in (0, 1)
        assert row["perf/time_step"] >= row["perf/time_pass1"] > 0
        assert row["perf/samples_per_second"] == pytest.approx(9 / row["perf/time_step"], rel=1e-6)
    evals = [row for row in history(path) if "eval/ndcg@10" in row]
    assert [row["_step"] for row in evals] == ([0, 2, 3] if stage == "zero2" else [0, 3])
    assert all(math.isfinite(row[key]) for row in evals for key in documented["eval"])
    lines = [json.loads(line) for line in (runs[stage] / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss" in line] == list(range(1, STEPS + 1))
    # the file holds what W&B got (W&B merges a step's train and eval records into one row)
    assert [{k: v for k, v in line.items() if k not in ("step", "dataset", "batch_digest")} for line in lines
            if "train/loss" in line] == [{k: v for k, v in row.items() if k in expected} for row in rows]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_wandb_run_config_and_metric_definitions(runs, stage):
    path = run_file(runs[stage])
    logged = config(path)
    assert logged["train"]["global_batch_size"] == 9 and logged["world_size"] == 2
    assert logged["deepspeed"]["zero_optimization"]["stage"] == int(stage[-1])
    assert logged["versions"]["deepspeed"] == deepspeed.__version__
    assert logged["versions"]["torch"] == torch.__version__
    assert json.loads((runs[stage] / "run_config.json").read_text())["versions"] == logged["versions"]
    metrics = [r.metric for r in records(path) if r.WhichOneof("record_type") == "metric"]
    globs = {m.glob_name: m for m in metrics if m.glob_name}
    for section in ("train", "negatives", "perf", "system", "eval"):
        assert globs[f"{section}/*"].step_metric == "train/step"
    assert globs["eval/*"].summary.max
    named = {m.name: m for m in metrics if m.name}
    assert named["train/loss"].summary.min and named["system/peak_memory_gb_max"].summary.max


def test_sharded_evaluation_equals_one_process_evaluation_of_the_saved_model(runs, tiny_model_dir):
    heldout = corpus(HELDOUT, 0, seed=12)
    for stage in ("zero2", "zero3"):
        summary = json.loads((runs[stage] / "summary.json").read_text())
        saved = SentenceTransformer(str(runs[stage]), device="cpu")
        reference = evaluate_model(saved, heldout["anchor"], heldout["positive"])
        assert summary["after"] == pytest.approx(reference, abs=1e-9), stage
        initial = SentenceTransformer(str(tiny_model_dir), device="cpu")
        assert summary["before"] == pytest.approx(evaluate_model(initial, heldout["anchor"], heldout["positive"]),
                                                  abs=1e-9)


def test_the_best_evaluation_keeps_its_model(runs):
    best = json.loads((runs["zero2"] / "best" / "eval.json").read_text())
    evals = [json.loads(line) for line in (runs["zero2"] / "metrics.jsonl").read_text().splitlines()
             if "eval/ndcg@10" in line]
    trained = [e for e in evals if e["step"] > 0]
    top = max(trained, key=lambda e: e["eval/ndcg@10"])  # the first of equal values: only a strictly better one replaces
    assert best["metric"] == "ndcg@10" and best["step"] == top["step"] and best["value"] == top["eval/ndcg@10"]
    assert json.loads((runs["zero2"] / "summary.json").read_text())["best"] == best
    heldout = corpus(HELDOUT, 0, seed=12)
    model = SentenceTransformer(str(runs["zero2"] / "best"), device="cpu")
    assert evaluate_model(model, heldout["anchor"], heldout["positive"]) == pytest.approx(best["metrics"], abs=1e-9)
    assert not (runs["zero3"] / "best").exists()  # no eval_every_steps: before and after only


def test_saved_models_load_and_agree_across_zero_stages(runs, tiny_model_dir):
    texts = ["query 1 alpha river", "doc 7 storm window table", "a sentence the model never saw"]
    initial = SentenceTransformer(str(tiny_model_dir), device="cpu").encode(texts, convert_to_tensor=True)
    saved = {s: SentenceTransformer(str(runs[s]), device="cpu").encode(texts, convert_to_tensor=True) for s in runs}
    assert not torch.allclose(saved["zero2"], initial, atol=1e-4)  # it trained
    for other in ("zero3", "zero3_offload"):
        err = float((saved[other] - saved["zero2"]).norm() / saved["zero2"].norm())
        assert err < 1e-5, (other, err)  # ZeRO-3 (offload too) saved the consolidated weights of the same update
    info = json.loads((runs["zero3"] / "ds_contrastive.json").read_text())
    assert info["global_step"] == STEPS and 0 < info["temperature"] < 1
    summary = json.loads((runs["zero3"] / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) >= {"recall@1", "mrr@10"}
