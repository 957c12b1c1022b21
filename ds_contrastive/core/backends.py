"""How pass 2 reaches the optimizer: one gradient reduction for all chunks, whatever wraps the model.

The cached step re-embeds its chunks one at a time and back-propagates each;
the gradients must be reduced across ranks once, after the last chunk, never
once per chunk. Each backend says how its wrapper is told so:

- DeepSpeed ZeRO 1/2/3: ``coalesce_grad_reduction()`` around the whole pass
  (gradients are flushed, reduced and partitioned once at its end);
- DeepSpeed ZeRO-0 (and its bf16 wrapper): ``set_gradient_accumulation_boundary``
  is false for every chunk but the last, so only the last backward all-reduces;
- ``DistributedDataParallel``: every chunk but the last runs under ``no_sync()``
  (forward included: DDP decides at forward time whether to reduce);
- a plain module in one process: nothing to reduce.

Each backend also turns the wrapped model's output into ``(embedding, scale)``:
``scale`` is the learnable logit scale when the module carries one, else None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from .embedding_module import LOGIT_SCALE

Unpack = Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]]


def sentence_embedding(output: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A SentenceTransformer's output: its ``sentence_embedding``, and the learnable scale if it carries one.

    (:func:`~ds_contrastive.core.embedding_module.attach_log_scale` gives it one for the Trainer.)
    """
    return output["sentence_embedding"], output.get(LOGIT_SCALE)


def embedding_and_scale(output: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An :class:`~ds_contrastive.core.embedding_module.EmbeddingModule`'s output, which already is (embedding, scale)."""
    return output


def grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of a module's (already reduced, unpartitioned) gradients."""
    grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


class Backend(Protocol):
    """What the cached step needs from whatever wraps the model.

    ``last_forward_reduces``: the wrapper decides at forward time whether a
    backward reduces gradients (DDP), so the last chunk of pass 2 must be a
    fresh forward, never a graph kept from pass 1. ``module`` is the wrapped
    model itself and ``wrapper`` names what wraps it: a forward call's cost
    depends on both (:mod:`~ds_contrastive.core.calibration` measures it).
    """

    device: torch.device
    last_forward_reduces: bool
    module: torch.nn.Module
    wrapper: str

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def reduction(self) -> contextlib.AbstractContextManager: ...

    def chunk(self, last: bool) -> contextlib.AbstractContextManager: ...


class DeepSpeedBackend:
    """A ``DeepSpeedEngine``: ``engine.backward`` per chunk, one reduction for the pass."""

    def __init__(self, engine: Any, unpack: Unpack = embedding_and_scale) -> None:
        self.engine = engine
        self.unpack = unpack
        self.device = engine.device
        self.last_forward_reduces = False
        self.module = engine.module
        self.wrapper = f"deepspeed-zero{engine.zero_optimization_stage()}"
        # The coalesced reduction needs a ZeRO 1/2/3 optimizer; ZeRO-0 and the
        # bf16 optimizer wrapper use the accumulation-boundary API instead.
        self.coalesce = engine.zero_optimization_stage() in (1, 2, 3) and hasattr(
            engine.optimizer, "_coalesce_grad_reduction")

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.unpack(self.engine(features))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        """``engine.step()``; returns the gradient norm, measured here where DeepSpeed reports none (ZeRO-0)."""
        own = grad_norm(self.engine.module) if self.engine.zero_optimization_stage() == 0 else None
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or own or 0.0)

    def reduction(self) -> contextlib.AbstractContextManager:
        return self.engine.coalesce_grad_reduction() if self.coalesce else contextlib.nullcontext()

    @contextlib.contextmanager
    def chunk(self, last: bool) -> Iterator[None]:
        if not self.coalesce:
            self.engine.set_gradient_accumulation_boundary(last)
        yield


class TorchBackend:
    """A plain module, or one wrapped in ``DistributedDataParallel`` (reduced in the last chunk only)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, unpack: Unpack = sentence_embedding) -> None:
        self.model = model
        self.unpack = unpack
        self.device = device
        self.ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.last_forward_reduces = self.ddp
        self.module = model.module if self.ddp else model
        self.wrapper = "ddp" if self.ddp else "plain"

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.unpack(self.model(features))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduction(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def chunk(self, last: bool) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if self.ddp and not last else contextlib.nullcontext()
