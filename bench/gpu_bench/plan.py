"""The plan: the items a run times, by importance, what it leaves out, and which items --items picks.

The full cross product (3 shapes x 2 workloads x 2 batch sizes x 2 libraries) does not fit the
8-minute budget, so the items run by importance and the later ones are skipped when time runs out.
On an H200-class card the 1,048,576-row item goes before bert-large, since its target names an H200.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sizes import scaled_rows

if TYPE_CHECKING:
    from .budget import Budget

Item = tuple[str, str, str, int, tuple[str, ...]]  # name, workload, shape, nominal rows, parts

PLAN: list[Item] = [
    # name, workload, shape, rows, parts
    ("fixed-minilm-16k", "fixed", "minilm", 16384, ("ds2", "floor", "st")),
    ("realistic-minilm-16k", "realistic", "minilm", 16384, ("ds2", "floor", "st")),
    ("fixed-bert-base-16k", "fixed", "bert-base", 16384, ("ds2", "floor", "st")),
    ("realistic-bert-base-16k", "realistic", "bert-base", 16384, ("ds2", "floor", "st")),
    ("realistic-bert-base-16k-zero3", "realistic", "bert-base", 16384, ("ds3",)),
    ("fixed-minilm-65k", "fixed", "minilm", 65536, ("ds2", "floor", "st")),
    ("fixed-bert-large-16k", "fixed", "bert-large", 16384, ("ds2", "floor", "st")),
    ("fixed-minilm-1m", "fixed", "minilm", 1048576, ("ds2", "floor")),  # before bert-large on an H200
    ("realistic-minilm-65k", "realistic", "minilm", 65536, ("ds2", "floor", "st")),
    ("fixed-bert-base-65k", "fixed", "bert-base", 65536, ("ds2", "floor", "st")),
    ("realistic-bert-base-65k", "realistic", "bert-base", 65536, ("ds2", "floor")),
    ("realistic-bert-large-16k", "realistic", "bert-large", 16384, ("ds2", "floor", "st")),
]
RESTRICTIONS = [
    "bert-large: fixed workload at 16,384 only (realistic 16,384 is the last, optional item)",
    "65,536: MiniLM fixed and realistic, bert-base fixed (with ST) and realistic (ds_contrastive + floor only)",
    "1,048,576 (MiniLM, fixed): ds_contrastive only; its floor is sampled (every k-th chunk, scaled by padded tokens)",
    "ZeRO-3 is timed for bert-base realistic 16,384 only (ds_contrastive only)",
    "items or parts whose estimated time does not fit the remaining budget are skipped (ST first, then the floor)",
]


def select(items: str) -> list[Item]:
    """--items: the comma-separated names or (1-based) numbers of the items to run, in the plan's order; "": all."""
    if not items:
        return PLAN
    wanted = [w.strip() for w in items.split(",") if w.strip()]
    return [p for k, p in enumerate(PLAN, 1) if p[0] in wanted or str(k) in wanted]


def big_batch_first(plan: list[Item]) -> list[Item]:
    """On an H200-class card the 1M batch (a target there) goes before bert-large (a target on every card)."""
    names = [p[0] for p in plan]
    if "fixed-bert-large-16k" in names and "fixed-minilm-1m" in names:
        i, j = names.index("fixed-bert-large-16k"), names.index("fixed-minilm-1m")
        if i < j:
            plan = list(plan)
            plan[i], plan[j] = plan[j], plan[i]
    return plan


def print_plan(plan: list[Item], budget: Budget, card: str) -> None:
    """--list: each item's parts with their estimated seconds, cumulated, and the budget."""
    total = 0.0
    for k, (name, workload, shape, rows, parts) in enumerate(plan, 1):
        est = {p: budget.part_estimate(p, shape, workload, scaled_rows(rows, budget.smoke)) for p in parts}
        total += sum(est.values())
        budget.probed.update((shape, int(p[2])) for p in parts if p.startswith("ds"))
        parts_text = "  ".join(f"{p} {v:6.1f} s" for p, v in est.items())
        print(f"{k:2d} {name:32s} {parts_text}   (cumulative {total:6.1f} s)")
    print(f"card {card} (factor {budget.factor}), budget {budget.seconds:.0f} s, "
          "plus setup (imports, models, texts: ~25 s)")
