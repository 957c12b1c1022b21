"""The run's outputs: the JSON report, rewritten after every part, and the markdown table beside it.

The JSON is written (atomically) after every part so that a run cut short by its budget, an
out-of-memory error or the watchdog still leaves everything measured so far; the table (also in the
JSON under "table_markdown") lists one row per item and then each target's verdict.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from .clock import elapsed
from .ratios import targets


def out_paths(out: str, card: str, smoke: bool) -> tuple[Path, Path]:
    """``--out`` is a file (.json) or a folder (ends with / or exists): then <card>-<date>.json in it."""
    path = Path(out)
    if out.endswith("/") or path.is_dir():
        stem = f"{card}-{_dt.date.today().isoformat()}" + ("-smoke" if smoke else "")
        path = path / f"{stem}.json"
    return path, path.with_suffix(".md")


def table(report: dict) -> str:
    """The markdown table of the report's items, then one line per target."""
    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    def retain(ds: dict) -> str:
        setting = ds["retain_tokens"]
        setting = f"{setting:,}" if isinstance(setting, int) else setting
        return f"{setting}: {ds['kept_chunks']:.0f}/{ds['chunks']:.0f}"

    head = ("| workload | model | batch | ZeRO | ds step (s) | ds samples/s | ds tokens/s | ds peak (GiB) "
            "| retain: kept/chunks "
            "| floor (s) | ds/floor | ST mini-batch | ST step (s) | ST samples/s | ST peak (GiB) | ds/ST step "
            "| ds/ST samples/s |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for item in report["items"]:
        p, r = item["parts"], item.get("ratios", {})
        if item["status"] == "skipped":
            lines.append(f"| {item['workload']} | {item['shape']} | {item['rows']:,} "
                         f"| skipped ({item.get('reason', '')}) |")
            continue
        dkey = "ds3" if "ds3" in p else "ds2"
        ds, floor, st = p.get(dkey, {}), p.get("floor", {}), p.get("st", {})
        dsok, flok, stok = ds.get("status") == "done", floor.get("status") == "done", st.get("status") == "done"
        floor_s = floor.get("seconds") if flok else None
        if flok and floor.get("sampled_every", 1) > 1:
            floor_cell = f"{floor_s:.3g} (sampled 1/{floor['sampled_every']})"
        else:
            floor_cell = f(floor_s) if flok else (floor.get("status") or "-")
        mbs = st.get("mini_batch") if stok else None
        if stok:
            st_mbs = f"{mbs}" + (" (below tuned range)" if st.get("below_tuned_range") else "")
        else:
            st_mbs = st.get("status") or "-"
        lines.append(
            f"| {item['workload']} | {item['shape']} | {item['rows']:,} | {ds.get('zero_stage', dkey[2])} "
            f"| {f(ds.get('step_seconds')) if dsok else ds.get('status', '-')} "
            f"| {f(r.get('ds_samples_per_s'), '{:,.0f}')} "
            f"| {f(r.get('ds_tokens_per_s'), '{:,.0f}')} | {f(ds.get('peak_gib'), '{:.1f}') if dsok else '-'} "
            f"| {retain(ds) if dsok else '-'} | {floor_cell} "
            f"| {f(r.get('ds_over_floor'), '{:.2f}')} "
            f"| {st_mbs} | {f(st.get('step_seconds')) if stok else '-'} "
            f"| {f(r.get('st_samples_per_s'), '{:,.0f}')} "
            f"| {f(st.get('peak_gib'), '{:.1f}') if stok else '-'} | {f(r.get('ds_over_st_step'), '{:.2f}')} "
            f"| {f(r.get('ds_over_st_samples_per_s'), '{:.2f}')} |")
    lines.append("")
    for name, t in report.get("targets", {}).items():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[t.get("met")]
        detail = t.get("values") if "ratio" not in t else {**t["values"], "ratio": t["ratio"]}
        if "ran" in t:
            detail = {k: t[k] for k in ("ran", "card", "seconds", "peak_gib")}
        detail = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in detail.items()}
        lines.append(f"- {name}: **{met}** {detail}")
    return "\n".join(lines)


def write_report(report: dict, card: str, json_path: Path, md_path: Path) -> None:
    """Bring the report's elapsed time, targets and table up to date, and write the JSON and the table."""
    report["elapsed_s"] = elapsed()
    report["targets"] = targets(report["items"], card)
    report["table_markdown"] = table(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, json_path)
    md_path.write_text(report["table_markdown"] + "\n")
