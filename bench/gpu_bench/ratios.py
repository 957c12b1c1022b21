"""What the timings say: per-item rates and ratios, and whether each target of issue 5 was met.

Ratios are taken within the run (ds over ST, ds over the floor), so that they compare like with
like on one card. With retained graphs the engine skips the pass-2 forward of the kept chunks, so ds
over the floor is also given against the floor less those chunks' no-grad forwards
(floor_with_retain). A target is met only when every value it names was measured;
met_where_measured says how the measured ones stand.
"""

from __future__ import annotations

from .workloads import real_tokens


def ratios(item: dict) -> dict:
    """Samples/s and tokens/s of each side, and ds over ST and over the floor, from the parts that are done."""
    parts = item["parts"]
    ds = parts.get("ds2") if parts.get("ds2", {}).get("status") == "done" else None
    ds = ds or (parts.get("ds3") if parts.get("ds3", {}).get("status") == "done" else None)
    floor = parts.get("floor") if parts.get("floor", {}).get("status") == "done" else None
    st = parts.get("st") if parts.get("st", {}).get("status") == "done" else None
    r = {}
    real = real_tokens(item["workload"], item["rows"])
    if ds:
        r["ds_samples_per_s"] = item["rows"] / ds["step_seconds"]
        r["ds_tokens_per_s"] = real / ds["step_seconds"]
    if st:
        r["st_samples_per_s"] = item["rows"] / st["step_seconds"]
        r["st_tokens_per_s"] = real / st["step_seconds"]
    if ds and st:
        r["ds_over_st_step"] = ds["step_seconds"] / st["step_seconds"]
        r["ds_over_st_samples_per_s"] = st["step_seconds"] / ds["step_seconds"]
    if ds and floor:
        r["ds_over_floor"] = ds["step_seconds"] / floor["seconds"]
        kept = ds.get("kept_chunks")
        cum = floor.get("nograd_cumulative")
        if kept and cum:
            with_retain = floor["seconds"] - cum[int(kept) - 1]
            r["floor_with_retain_seconds"] = with_retain
            r["ds_over_floor_with_retain"] = ds["step_seconds"] / with_retain
    return r


def find(items: list[dict], name: str) -> dict | None:
    for item in items:
        if item["name"] == name:
            return item
    return None


def targets(items: list[dict], card: str) -> dict:
    """Each target's values, and whether it was met (None: not measured); ``card`` decides the H200 target."""
    def ratio(name: str, key: str):
        item = find(items, name)
        return None if item is None else item.get("ratios", {}).get(key)

    def verdict(values: dict, ok) -> dict:
        measured = {k: v for k, v in values.items() if v is not None}
        met = None if len(measured) < len(values) else all(ok(v) for v in measured.values())
        partial = all(ok(v) for v in measured.values()) if measured else None
        return {"values": values, "met": met, "met_where_measured": partial}

    t = {}
    t["fixed_step_le_0.90_st"] = verdict(
        {s: ratio(f"fixed-{s}-16k", "ds_over_st_step") for s in ("minilm", "bert-base", "bert-large")},
        lambda v: v <= 0.90)
    t["realistic_samples_ge_3.0x_st"] = verdict(
        {s: ratio(f"realistic-{s}-16k", "ds_over_st_samples_per_s") for s in ("minilm", "bert-base")},
        lambda v: v >= 3.0)
    floors = {i["name"]: i.get("ratios", {}).get("ds_over_floor") for i in items
              if i.get("parts", {}).get("floor", {}).get("status") == "done" and i["nominal_rows"] <= 65536}
    t["step_le_1.05_floor"] = verdict(floors, lambda v: v <= 1.05) if floors else {"values": {}, "met": None}
    # with retained graphs the engine skips the pass-2 forward of the kept chunks: the floor of what it runs
    t["step_le_1.05_floor"]["values_against_floor_with_retain"] = {
        i["name"]: i.get("ratios", {}).get("ds_over_floor_with_retain") for i in items
        if i["name"] in floors}

    def ds_peak(name: str):
        item = find(items, name)
        ds = item["parts"].get("ds2", {}) if item else {}
        return ds.get("peak_gib") if ds.get("status") == "done" else None

    pa, pb = ds_peak("fixed-minilm-16k"), ds_peak("fixed-minilm-65k")
    t["minilm_peak_65k_le_1.1x_16k"] = {"values": {"16k_gib": pa, "65k_gib": pb},
                                         "ratio": pb / pa if pa and pb else None,
                                         "met": (pb / pa <= 1.1) if pa and pb else None}
    big = find(items, "fixed-minilm-1m")
    status = big["parts"].get("ds2", {}).get("status") if big else None  # done, oom, error, or not run
    ran = status == "done"
    t["1m_batch_runs_on_one_h200"] = {
        "ran": ran, "status": status, "card": card,
        "seconds": big["parts"]["ds2"]["step_seconds"] if ran else None,
        "peak_gib": big["parts"]["ds2"]["peak_gib"] if ran else None,
        "met": (ran if status in ("done", "oom", "error") else None) if card == "h200" else None,
        "note": None if card == "h200" else "the target names an H200; this run is on " + card}
    z2 = find(items, "realistic-bert-base-16k")
    z3 = find(items, "realistic-bert-base-16k-zero3")
    s2 = z2["parts"].get("ds2", {}).get("step_seconds") if z2 else None
    s3 = z3["parts"].get("ds3", {}).get("step_seconds") if z3 else None
    t["zero3_le_1.15x_zero2"] = {"values": {"zero2_s": s2, "zero3_s": s3}, "ratio": s3 / s2 if s2 and s3 else None,
                                  "met": (s3 / s2 <= 1.15) if s2 and s3 else None}
    return t
