"""The time budget: estimates of each part's seconds, and whether the next one still fits.

The whole run must end within its budget (430 s by default; the watchdog exits 35 s later), so each
item's parts are estimated before they run and dropped when they no longer fit. The estimates come
from H200 rates of earlier reference runs of other scripts, scaled per card, and are recalibrated on
this run's own measurements as parts finish.
"""

from __future__ import annotations

import statistics

from .clock import elapsed
from .sizes import warm_rows
from .workloads import real_tokens

# H200 seconds per million non-pad tokens, bf16, from the reference runs in shared/bench
# (anchor_gpu_h200.json, anchor_varlen_h200.json); bert-large realistic is extrapolated. Used only
# to decide what fits the budget; the estimates are recalibrated on the run's own measurements.
RATES_H200 = {
    "minilm": {"floor": {"fixed": 0.55, "realistic": 1.0}, "st": {"fixed": 0.6, "realistic": 2.9}},
    "bert-base": {"floor": {"fixed": 2.4, "realistic": 3.7}, "st": {"fixed": 2.5, "realistic": 13.5}},
    "bert-large": {"floor": {"fixed": 7.3, "realistic": 11.0}, "st": {"fixed": 7.5, "realistic": 40.0}},
}
LOSS_SECONDS_PER_ROW2 = 4.5e-11  # fp32 tiled loss, forward + backward, per (global rows)^2 (~45 s at 1M)
CARD_FACTOR = {"h200": 1.0, "h100": 1.4}


class Budget:
    """Seconds from the start the run may spend, and the estimates it is spent by."""

    def __init__(self, seconds: float, factor: float, smoke: bool, cuda: bool, steps: int) -> None:
        self.seconds = seconds
        self.factor = factor  # the card's time relative to an H200's
        self.smoke = smoke
        self.cuda = cuda
        self.steps = steps  # --steps: timed steps per part (0: chosen from the estimate)
        self.calibration: list[float] = []  # per finished part: measured / uncalibrated estimate
        self.probed: set[tuple[str, int]] = set()  # (shape, ZeRO stage) whose chunk costs are measured

    def calib(self) -> float:
        if not self.calibration:
            return 1.0
        return min(4.0, max(0.5, statistics.median(self.calibration)))

    def record(self, estimate: float, seconds: float) -> None:
        """A part estimated at ``estimate`` (calibrated) took ``seconds``: recalibrate the later estimates."""
        self.calibration.append(seconds / (estimate / self.calib()))

    def step_estimate(self, part: str, shape: str, workload: str, rows: int) -> float:
        mtok = real_tokens(workload, rows) / 1e6
        r = RATES_H200[shape]
        if part == "st":
            s = r["st"][workload] * mtok
        else:
            s = r["floor"][workload] * mtok * (1.05 if part == "ds2" else 1.3 if part == "ds3" else 1.0)
            if part.startswith("ds"):
                s += LOSS_SECONDS_PER_ROW2 * rows**2
        return s * self.factor * self.calib()

    def steps_for(self, step_estimate: float, shape: str) -> int:
        if self.steps:
            return self.steps
        if self.smoke:
            return 2 if shape == "minilm" else 1
        return 2 if step_estimate < 3.0 else 1

    def part_estimate(self, part: str, shape: str, workload: str, rows: int) -> float:
        step = self.step_estimate(part, shape, workload, rows)
        if part == "floor":
            return 3 + step * (1 / 32 if rows > 200_000 else 1 / 4 if rows > 16384 else 1.0) * 1.1
        steps = self.steps_for(step, shape)
        setup = 4 if self.cuda else 6
        if part.startswith("ds"):
            load = 8 if rows > 200_000 else 0  # loading the pickled 1M batch
            # the engine's chunk-cost probe: the first time this run builds a model at a ZeRO stage (then cached)
            probe = 0 if (shape, int(part[2])) in self.probed else 3
            return setup + load + probe + step * (steps + warm_rows(rows, self.smoke) / rows)
        return setup + 3 + step * (steps + 0.2)

    def left(self) -> float:
        return self.seconds - elapsed()

    def fits(self, seconds: float) -> bool:
        return elapsed() + seconds <= self.seconds
