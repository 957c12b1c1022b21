"""The run's clock: seconds since the benchmark started, and log lines stamped with them.

The clock starts when this module is first imported, at the top of the script, so that the time
budget and the watchdog count from the start of the run, imports and setup included.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()


def elapsed() -> float:
    """Seconds since the run started: what the budget is spent in."""
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)
