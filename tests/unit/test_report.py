"""``ds-contrastive report``: every plot drawn from a run's metrics, a page that stands alone, clear errors."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ds_contrastive.errors import ReportError
from ds_contrastive.run.report import collect, figures, read_records, run_steps, write_report
from jobs import ROOT, job_env

STEPS = list(range(1, 8))
SKIPPED_STEP = 4  # its grad norm is NaN
DATASETS = {1: "web", 2: "code", 3: "web", 4: "web", 5: "code", 6: "web", 7: "code", 8: "web"}  # 8: cut by a kill
TERMS = ("anchor_doc", "anchor_anchor", "positive_positive")
ODD_MODEL = 'models/<b>"mini"&lm'  # must reach the page escaped


def step_record(step: int) -> dict:
    """One optimizer step's line, with every section a guided Matryoshka run over two datasets logs."""
    name = DATASETS[step]
    loss = 3.0 / step
    record = {"step": step, "train/loss": loss, "train/accuracy": 0.1 * step, "train/temperature": 0.05,
              "train/lr": 1e-5 * step, "train/grad_norm": math.nan if step == SKIPPED_STEP else 2.0 / step,
              "train/skipped": float(step == SKIPPED_STEP), "train/skipped_steps": float(step >= SKIPPED_STEP),
              "train/truncated_texts": 1.0, "train/truncated_texts_total": float(step),
              "train/loss@64": loss * 1.2, "train/accuracy@64": 0.08 * step,
              f"train/{name}/loss": loss, f"train/{name}/accuracy": 0.1 * step,
              "negatives/global_batch_size": 64.0, "negatives/candidates_per_anchor": 127.0,
              "negatives/masked_duplicates": float(step % 3), "negatives/positive_similarity": 0.5 + 0.04 * step,
              "negatives/hardest_negative_similarity": 0.6 - 0.02 * step,
              "perf/samples_per_second": 100.0 + step, "perf/tokens_per_second": 4000.0 + 30 * step,
              "perf/padding_fraction": 0.2, "perf/time_step": 0.7, "perf/time_prepare": 0.05,
              "perf/time_pass1": 0.2, "perf/time_guide": 0.1, "perf/time_gather_loss": 0.02,
              "perf/time_pass2": 0.25, "perf/time_optimizer": 0.03, "perf/chunks": 4.0, "perf/kept_chunks": 0.0,
              "system/peak_memory_gb_min": 10.0 + step, "system/peak_memory_gb_max": 12.0 + step,
              "system/peak_memory_gb_max_rank": 1.0, "dataset": name, "batch_digest": f"{step:08x}"}
    for i, term in enumerate(TERMS):
        record[f"negatives/guide_masked_fraction/{term}"] = 0.01 * (i + 1) * step
        record[f"negatives/guide_masked_similarity/{term}"] = 0.8 - 0.01 * i
    return record


def eval_record(step: int) -> dict:
    return {"step": step, "eval/recall@1": 0.3 + 0.05 * step, "eval/recall@10": 0.7 + 0.01 * step,
            "eval/mrr@10": 0.4 + 0.03 * step, "eval/ndcg@10": 0.5 + 0.02 * step}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run's output_dir: 7 steps, evals before and after, summary, run config, and a line cut by a kill."""
    lines = [json.dumps(eval_record(0))] + [json.dumps(step_record(s)) for s in STEPS] + [json.dumps(eval_record(7))]
    cut = json.dumps(step_record(8))[:40]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + cut)
    (tmp_path / "summary.json").write_text(json.dumps({"world_size": 2, "steps": 7, "wall_seconds": 3723.4}))
    (tmp_path / "run_config.json").write_text(json.dumps({
        "train": {"model": ODD_MODEL, "global_batch_size": 64, "lr": 5e-5, "guide": "builtin"},
        "deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
        "versions": {"torch": "9.9.9-test", "deepspeed": "0.19.2"}, "world_size": 2}))
    return tmp_path


def drawn(run_dir: Path) -> dict:
    return figures(collect(read_records(run_dir / "metrics.jsonl")))


def line_steps(figure) -> list[list[int]]:
    """The x data (steps) of every line of every panel of ``figure``."""
    return [[int(x) for x in line.get_xdata()] for ax in figure.axes for line in ax.get_lines()]


def test_records_skip_the_cut_last_line_only(run_dir):
    records = read_records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, *STEPS, 7]
    assert run_steps(collect(records)) == STEPS
    assert math.isnan(collect(records)["train/grad_norm"][1][SKIPPED_STEP - 1])
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + "\n" + json.dumps(step_record(8)) + "\n")  # the cut line is no longer last
    with pytest.raises(ReportError, match=re.escape(f"{path}:10 is not JSON")):
        read_records(path)


def test_every_per_step_series_has_every_step(run_dir):
    plots = drawn(run_dir)
    assert set(plots) == {"loss", "per_dataset", "accuracy", "grad_norm", "throughput", "step_time", "memory",
                          "masking", "similarities", "lr_temperature", "eval"}
    for name, figure in plots.items():
        if name in ("per_dataset", "eval"):
            continue
        lines = line_steps(figure)
        assert lines, name
        assert all(steps == STEPS for steps in lines), (name, lines)
    assert len(line_steps(plots["loss"])) == 2  # loss and loss@64
    assert len(line_steps(plots["masking"])) == 1 + len(TERMS)
    assert len(line_steps(plots["similarities"])) == 2 + len(TERMS)
    grad_norm = plots["grad_norm"].axes[0].get_lines()[0].get_ydata()
    assert np.isnan(grad_norm[SKIPPED_STEP - 1]) and np.isfinite(np.delete(grad_norm, SKIPPED_STEP - 1)).all()


def test_stacked_step_time_covers_every_step_and_phase(run_dir):
    ax = drawn(run_dir)["step_time"].axes[0]
    areas = ax.collections
    assert [area.get_label() for area in areas] == ["perf/time_prepare", "perf/time_pass1", "perf/time_guide",
                                                    "perf/time_gather_loss", "perf/time_pass2", "perf/time_optimizer"]
    for area in areas:
        assert sorted({int(x) for x in area.get_paths()[0].vertices[:, 0]}) == STEPS
    top = max(area.get_paths()[0].vertices[:, 1].max() for area in areas)
    assert top == pytest.approx(0.65)  # the phases' sum, stacked


def test_sparse_series_split_the_steps(run_dir):
    plots = drawn(run_dir)
    for ax in plots["per_dataset"].axes:  # loss, then accuracy
        by_dataset = {line.get_label(): [int(x) for x in line.get_xdata()] for line in ax.get_lines()}
        assert set(by_dataset) == {f"train/{name}/{ax.get_ylabel()}" for name in ("code", "web")}
        assert sum(len(steps) for steps in by_dataset.values()) == len(STEPS)
        assert sorted(s for steps in by_dataset.values() for s in steps) == STEPS
        assert by_dataset[f"train/web/{ax.get_ylabel()}"] == [s for s in STEPS if DATASETS[s] == "web"]
    assert all(steps == [0, 7] for steps in line_steps(plots["eval"]))
    assert len(line_steps(plots["eval"])) == 4


def referenced_images(index: Path) -> list[Path]:
    page = index.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == page.count("<img")
    return [index.parent / source for source in sources]


def assert_drawn(image: Path) -> None:
    """The PNG decodes and shows data: several colours, and coloured (not grey) pixels of lines or areas."""
    pixels = np.asarray(Image.open(image).convert("RGB")).astype(int)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, image
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 40
    assert coloured.mean() > 0.002, (image, coloured.mean())


def test_cli_writes_a_self_contained_page(run_dir):
    result = subprocess.run([sys.executable, "-m", "ds_contrastive", "report", str(run_dir)], env=job_env(),
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    index = Path(result.stdout.strip())
    assert index == run_dir / "report" / "index.html"
    images = referenced_images(index)
    assert {image.name for image in images} == {f"{name}.png" for name in drawn(run_dir)}
    for image in images:
        assert image.parent == index.parent and image.is_file()
        assert_drawn(image)
    page = index.read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert "&lt;b&gt;&quot;mini&quot;&amp;lm" in page and ODD_MODEL not in page
    for fact in ("torch 9.9.9-test", "7 (1 to 7)", "1:02:03", "deepspeed zero_optimization.stage"):
        assert fact in page, fact
    # the table's grad norm: last 2/7, min over finite values 2/7, max 2/1 (the NaN step left out)
    assert "<td>train/grad_norm</td><td>0.2857</td><td>0.2857</td><td>2</td>" in page
    # the eval table: a row per evaluated step, columns mrr@10, ndcg@10, recall@1, recall@10
    assert "<th>eval/recall@1</th>" in page and "<td>0</td><td>0.4</td><td>0.5</td><td>0.3</td><td>0.7</td>" in page


def test_out_dir_and_a_run_without_optional_files(run_dir, tmp_path_factory):
    (run_dir / "summary.json").unlink()
    (run_dir / "run_config.json").unlink()
    out = tmp_path_factory.mktemp("elsewhere")
    index = write_report(run_dir, out)
    assert index == out / "index.html" and not (run_dir / "report").exists()
    for image in referenced_images(index):
        assert_drawn(image)


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ReportError, match=re.escape(str(missing))):
        write_report(missing)
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('[1, 2]\n{"step": 1}\n')
    with pytest.raises(ReportError, match=re.escape(f"{tmp_path / 'metrics.jsonl'}:1 is not a metrics record")):
        write_report(tmp_path)
    result = subprocess.run([sys.executable, "-m", "ds_contrastive", "report", str(missing)], env=job_env(),
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"{missing} is not a directory" in result.stderr
