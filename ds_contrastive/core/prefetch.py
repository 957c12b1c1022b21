"""Prepare the next batches in a background thread while the current step runs.

Tokenizing a global batch's shard (tens of thousands of texts) takes a
noticeable fraction of a GPU step. The fast tokenizers release the GIL while
they encode, so a worker thread can tokenize and plan batch i+1 while the
main thread drives the accelerator through step i.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


def prefetched(fn: Callable[[In], Out], items: Iterable[In], depth: int = 1) -> Iterator[Out]:
    """Yield ``fn(item)`` for each item in order, computing up to ``depth`` results ahead in one thread.

    ``items`` is drawn from the worker thread too, so a lazy source (reading
    and sharding the next global batch) overlaps the step as well. An
    exception raised by ``items`` or ``fn`` surfaces at the ``next()`` that
    would have returned that result. Closing the generator early (``break``)
    waits for the one call in flight and discards what was computed ahead.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    source = iter(items)
    done = object()

    def produce() -> object:
        item = next(source, done)
        return done if item is done else fn(item)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds_contrastive-prefetch") as pool:
        ahead: deque[Future] = deque(pool.submit(produce) for _ in range(depth))
        try:
            while True:
                result = ahead.popleft().result()
                if result is done:
                    return
                ahead.append(pool.submit(produce))
                yield result
        finally:
            for future in ahead:
                future.cancel()
