"""Ending a run on time: the watchdog that saves the report and exits.

The budget is checked only before each item, so an item that takes far longer than estimated
overruns it; the watchdog fires at budget + grace (by default the whole command then ends in under 8
minutes), writes what was measured and exits the process at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING

from .clock import log

if TYPE_CHECKING:
    from .runner import Bench


def watchdog(bench: Bench, seconds: float) -> threading.Timer:
    """After ``seconds``: mark the report, save it, stop the background process, and exit with status 3."""
    def fire() -> None:
        log(f"watchdog: {seconds:.0f} s passed (budget + grace); saving and exiting")
        with contextlib.suppress(Exception):
            bench.report["watchdog_exit"] = True
            bench.save()
            bench.worker.stop()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer
