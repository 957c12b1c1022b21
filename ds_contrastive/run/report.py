"""``ds-contrastive report RUN_DIR``: plots and one HTML page of a training run, from its files alone.

A run's ``metrics.jsonl`` (one JSON object a line: per-step metrics under ``train/``, ``negatives/``,
``perf/`` and ``system/``, held-out retrieval under ``eval/``) is all the page needs; ``summary.json``
and ``run_config.json``, when present, fill in its header (world size, wall time, versions, settings).
Keys are sorted into plots by pattern, so a metric added later under a known prefix (another
``perf/time_*`` phase, another guide term, another dataset) is drawn without a change here.

The page needs nothing outside its folder (no script, no external URL, images by relative path), so
the ``report/`` folder can be copied off a cluster or attached to an issue as it is. Figures are drawn on matplotlib's Agg
canvas directly, never through pyplot: the report leaves pyplot's global state (backend, open figures)
alone, so it is safe inside a process that plots too.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import ReportError

# metric key -> (steps, values), in file order
Series = dict[str, tuple[list[int], list[float]]]

# The rows of the page's table: the numbers one checks first after a run.
MAIN_METRICS = ("train/loss", "train/accuracy", "train/grad_norm", "train/lr", "train/temperature",
                "train/skipped_steps", "train/truncated_texts_total", "train/bad_rows_skipped",
                "negatives/global_batch_size", "negatives/candidates_per_anchor", "negatives/masked_duplicates",
                "negatives/positive_similarity", "negatives/hardest_negative_similarity",
                "perf/samples_per_second", "perf/tokens_per_second", "perf/padding_fraction", "perf/time_step",
                "system/peak_memory_gb_min", "system/peak_memory_gb_max")
# Training settings shown in the header (those the run_config has), and DeepSpeed ones by path.
TRAIN_SETTINGS = ("model", "train_data", "datasets", "streaming", "global_batch_size", "epochs", "max_steps", "lr",
                  "warmup_ratio", "temperature", "learnable_temperature", "directions", "partition", "similarity",
                  "mask_duplicates", "guide", "margin_strategy", "margin", "matryoshka_dims", "precision",
                  "max_length", "chunk_tokens", "planner", "retain_tokens", "seed")
DEEPSPEED_SETTINGS = (("zero_optimization", "stage"), ("bf16", "enabled"), ("fp16", "enabled"),
                      ("gradient_clipping",))
# perf/time_* phases in the order a step runs them (the stack's bottom first); unknown phases go on top.
PHASES = ("prepare", "pass1", "guide", "gather_loss", "pass2", "optimizer")
STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:2px 8px}"
         "td{text-align:right;font-variant-numeric:tabular-nums}td:first-child{text-align:left}"
         "th[scope=row]{text-align:left;font-weight:normal;color:#555}img{max-width:100%}figure{margin:2em 0}")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl``, in order.

    A last line without its newline is what a kill in the middle of a write leaves: it is skipped when
    it is not JSON. Any other line that is not a JSON object with an integer ``step`` is an error that
    names the file and line, rather than a report that quietly leaves steps out.
    """
    if not path.is_file():
        raise ReportError(f"{path} not found: a training run writes it into its output_dir")
    lines = path.read_text(errors="replace").split("\n")  # a cut multi-byte character must not stop the read
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            if number == len(lines):  # no newline after it: cut short
                break
            raise ReportError(f"{path}:{number} is not JSON ({error})") from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise ReportError(f"{path}:{number} is not a metrics record (a JSON object with an integer 'step')")
        records.append(record)
    return records


def collect(records: Iterable[dict[str, Any]]) -> Series:
    """Each numeric field's steps and values; text fields (dataset, batch digest) are left out."""
    series: Series = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return series


def run_steps(series: Series) -> list[int]:
    """The optimizer steps the run logged; eval records (step 0 for before training) are not steps."""
    return sorted({step for key, (steps, _) in series.items() if not key.startswith("eval/") for step in steps})


def _natural(key: str) -> list[Any]:
    """Sort key that orders numbers by value: loss@64 before loss@384."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _keys(series: Series, pattern: str) -> list[str]:
    """The keys that match ``pattern`` as a whole, in natural order."""
    regex = re.compile(pattern)
    return sorted((key for key in series if regex.fullmatch(key)), key=_natural)


def _panels(rows: int) -> tuple[Figure, list[Axes]]:
    """A figure of ``rows`` panels over one shared step axis, on an Agg canvas (pyplot left alone)."""
    figure = Figure(figsize=(9, 1.5 + 2.3 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0])
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return figure, axes


def _panel_figure(series: Series, panels: tuple[tuple[str, str], ...], **style: Any) -> Figure | None:
    """One panel per (key pattern, y label) that matches a key, each key a line; None when none matches.

    Quantities of different units go in different panels rather than on twin axes, which are easy to
    misread.
    """
    found = [(keys, ylabel) for pattern, ylabel in panels if (keys := _keys(series, pattern))]
    if not found:
        return None
    figure, axes = _panels(len(found))
    for ax, (keys, ylabel) in zip(axes, found):
        for key in keys:
            ax.plot(*series[key], label=key, **style)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    return figure


def _phase_order(key: str) -> tuple[int, str]:
    phase = key.removeprefix("perf/time_")
    return (PHASES.index(phase) if phase in PHASES else len(PHASES), phase)


def _aligned(points: tuple[list[int], list[float]], steps: list[int]) -> np.ndarray:
    """Values at ``steps``: 0 where the series has none or NaN, as a phase that did not run took no time."""
    at = dict(zip(*points))
    return np.nan_to_num(np.array([at.get(step, 0.0) for step in steps]))


def step_time_figure(series: Series) -> Figure | None:
    """The ``perf/time_*`` phases stacked per step, and the whole step (``perf/time_step``) as a line."""
    phases = sorted((k for k in _keys(series, r"perf/time_.+") if k != "perf/time_step"), key=_phase_order)
    if not phases and "perf/time_step" not in series:
        return None
    figure, (ax,) = _panels(1)
    if phases:
        steps = run_steps(series)
        ax.stackplot(steps, [_aligned(series[key], steps) for key in phases], labels=phases, alpha=0.8)
    if "perf/time_step" in series:
        ax.plot(*series["perf/time_step"], color="black", linewidth=1, label="perf/time_step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))  # outside: the stack fills the panel
    return figure


class Plot(NamedTuple):
    name: str  # the PNG's file name, without .png
    caption: str
    draw: Callable[[Series], Figure | None]  # None: the run has no data for it


def _panel_plot(name: str, caption: str, *panels: tuple[str, str], **style: Any) -> Plot:
    return Plot(name, caption, functools.partial(_panel_figure, panels=panels, **style))


SPARSE = {"marker": "o", "markersize": 3, "linewidth": 0.8}
PLOTS = (
    _panel_plot("loss", "Training loss (and each Matryoshka dimension's, loss@dim).", (r"train/loss(@\d+)?", "loss")),
    _panel_plot("per_dataset", "Loss and accuracy of each dataset, at the steps whose batch came from it.",
                (r"train/.+/loss", "loss"), (r"train/.+/accuracy", "accuracy"), **SPARSE),
    _panel_plot("accuracy", "In-batch accuracy: how often the positive scores above every candidate.",
                (r"train/accuracy(@\d+)?", "accuracy")),
    _panel_plot("grad_norm", "Gradient norm; a gap is a step skipped for a non-finite loss or gradient.",
                (r"train/grad_norm", "gradient norm")),
    _panel_plot("throughput", "Throughput over all ranks.", (r"perf/samples_per_second", "samples/s"),
                (r"perf/tokens_per_second", "tokens/s")),
    Plot("step_time", "Time of each step by phase (stacked) and of the whole step (black line): the gap between "
         "them is time outside the measured phases.", step_time_figure),
    _panel_plot("memory", "Peak memory per rank (GPU: allocated by torch; CPU: resident set size): the lowest and "
                "highest over the ranks.",
                (r"system/peak_memory_gb_(min|max)", "GB")),
    _panel_plot("masking", "Candidates masked out of the loss: duplicates of the positive, and the fraction of each "
                "term's candidates the guide masked.", (r"negatives/masked_duplicates", "masked duplicates"),
                (r"negatives/guide_masked_fraction/.+", "guide-masked fraction")),
    _panel_plot("similarities", "Mean similarity of anchor and positive against the hardest negative (and of the "
                "candidates the guide masked): the gap is what the loss has left to learn.",
                (r"negatives/(positive|hardest_negative)_similarity|negatives/guide_masked_similarity/.+",
                 "similarity")),
    _panel_plot("lr_temperature", "Learning rate and softmax temperature.", (r"train/lr", "learning rate"),
                (r"train/temperature", "temperature")),
    _panel_plot("eval", "Held-out retrieval metrics (step 0: before training).", (r"eval/.+", "score"), **SPARSE),
)


def figures(series: Series) -> dict[str, Figure]:
    """The figure of each plot of PLOTS the run has data for, by plot name."""
    return {plot.name: figure for plot in PLOTS if (figure := plot.draw(series)) is not None}


def _number(value: float) -> str:
    return f"{value:.4g}"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """An HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def metrics_table(series: Series) -> str:
    """Last, min and max of each main metric the run logged (min and max over its finite values)."""
    rows = []
    for key in (key for key in MAIN_METRICS if key in series):
        values = series[key][1]
        finite = [value for value in values if math.isfinite(value)]
        low, high = (_number(min(finite)), _number(max(finite))) if finite else ("-", "-")
        rows.append((key, _number(values[-1]), low, high))
    return _table(("metric", "last", "min", "max"), rows)


def eval_table(series: Series) -> str:
    """One row per step with an evaluation, one column per eval metric; empty when the run has none."""
    keys = _keys(series, r"eval/.+")
    if not keys:
        return ""
    at = {key: dict(zip(*series[key])) for key in keys}
    steps = sorted({step for key in keys for step in at[key]})
    rows = [(step, *(_number(at[key][step]) if step in at[key] else "" for key in keys)) for step in steps]
    return "<h2>Evaluation</h2>" + _table(("step", *keys), rows)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d} ({seconds:.0f} s)"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def header_facts(run_dir: Path, series: Series, summary: dict[str, Any],
                 run_config: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) lines of the page's header, from what the run's files hold."""
    steps = run_steps(series)
    facts = [("run directory", str(run_dir.resolve())),
             ("steps", f"{len(steps)} ({steps[0]} to {steps[-1]})" if steps else "none logged")]
    world_size = summary.get("world_size", run_config.get("world_size"))
    if world_size is not None:
        facts.append(("world size", _text(world_size)))
    if isinstance(summary.get("wall_seconds"), (int, float)):
        facts.append(("wall time", _duration(summary["wall_seconds"])))
    if "resumed_from" in summary:
        facts.append(("resumed from", _text(summary["resumed_from"])))
    if isinstance(run_config.get("versions"), dict):
        facts.append(("versions", ", ".join(f"{name} {version}" for name, version in run_config["versions"].items())))
    train = run_config.get("train") if isinstance(run_config.get("train"), dict) else {}
    facts += [(key, _text(train[key])) for key in TRAIN_SETTINGS if key in train]
    for path in DEEPSPEED_SETTINGS:
        value: Any = run_config.get("deepspeed")
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            facts.append(("deepspeed " + ".".join(path), _text(value)))
    return facts


def page(run_dir: Path, series: Series, summary: dict[str, Any], run_config: dict[str, Any],
         plots: Iterable[str]) -> str:
    """The report's HTML: header, metrics table, eval table, then each plot's PNG with its caption."""
    captions = {plot.name: plot.caption for plot in PLOTS}
    facts = "".join(f"<tr><th scope=row>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
                    for name, value in header_facts(run_dir, series, summary, run_config))
    shown = "".join(f'<figure><img src="{html.escape(name)}.png" alt="{html.escape(name)}">'
                    f"<figcaption>{html.escape(captions[name])}</figcaption></figure>" for name in plots)
    title = html.escape(f"Training report: {run_dir.resolve().name}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><h1>{title}</h1><table>{facts}</table>"
            f"<h2>Metrics</h2>{metrics_table(series)}{eval_table(series)}<h2>Plots</h2>{shown}</body></html>\n")


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file of the run: {} when absent, an error naming it when unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise ReportError(f"{path} is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a JSON object")
    return data


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the plots and ``index.html`` of the run in ``run_dir`` into ``out`` (default RUN_DIR/report).

    Returns the path of ``index.html``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory: pass a training run's output_dir")
    series = collect(read_records(run_dir / "metrics.jsonl"))
    summary, run_config = _read_json(run_dir / "summary.json"), _read_json(run_dir / "run_config.json")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    drawn = figures(series)
    for name, figure in drawn.items():
        figure.savefig(out / f"{name}.png", dpi=100)
    index = out / "index.html"
    index.write_text(page(run_dir, series, summary, run_config, drawn), encoding="utf-8")
    return index
