"""The device the parts are timed on, and out-of-memory errors: real ones recognised, simulated ones raised.

Timing and peak memory on a GPU need synchronising and CUDA's allocator statistics; on a CPU (the
--smoke run) synchronising is a no-op and the peak is the process's resident high-water mark, so that
every part runs the same code on both. Smoke mode also raises one simulated out-of-memory error per
place that has a fallback, so that the fallbacks run on a CPU too.
"""

from __future__ import annotations

import gc

from . import GIB


class Device:
    """The GPU (or, with --cpu or without one, the CPU): its type, name and memory, and what times it."""

    def __init__(self, cpu: bool) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available() and not cpu
        self.type = "cuda" if self.cuda else "cpu"
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            self.name, self.total_mem = props.name, props.total_memory
        else:
            import psutil

            self.name, self.total_mem = "CPU", psutil.virtual_memory().total

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / GIB
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    def allocated_gib(self) -> float | None:
        return self.torch.cuda.memory_allocated() / GIB if self.cuda else None

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


class SimulatedOOM:
    """Smoke mode: raise an out-of-memory error once per tag, so that the fallbacks run on a CPU."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.fired: set[str] = set()

    def maybe(self, tag: str) -> None:
        if self.enabled and tag not in self.fired:
            self.fired.add(tag)
            import torch

            raise torch.cuda.OutOfMemoryError(f"simulated out of memory ({tag})")


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
