"""Where the loss's trainable scale lives: beside the embedding model, as a parameter of what DeepSpeed wraps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LOGIT_SCALE = "logit_scale"  # the key under which a SentenceTransformer carrying a log_scale returns its scale


def logit_scale(log_scale: nn.Parameter, max_scale: float) -> torch.Tensor:
    """The logit scale ``exp(log_scale)`` clamped to ``max_scale``, fp32, 0-dim (differentiable)."""
    return log_scale.float().exp().clamp(max=max_scale)[0]


class EmbeddingModule(nn.Module):
    """A SentenceTransformer and, when the temperature is learnable, its log logit-scale.

    The scale lives here, not in the loss, so that DeepSpeed's optimizer,
    ZeRO partitioning and checkpoints treat it like any other parameter. It
    is returned by ``forward`` so that ZeRO-3 gathers it the way it gathers
    encoder weights. A fixed temperature is not a module value at all (a
    buffer would be cast to bf16 with the module and drift). The scale has
    shape [1], not [], because DeepSpeed's parameter broadcast cannot view a
    0-dim tensor as bytes.
    """

    def __init__(self, model: nn.Module, log_scale: float | None = None, max_scale: float = 100.0) -> None:
        super().__init__()
        self.model = model
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor([float(log_scale)])) if log_scale is not None else None

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embedding = self.model(features)["sentence_embedding"]
        if self.log_scale is None:
            return embedding, None
        return embedding, logit_scale(self.log_scale, self.max_scale)


def attach_log_scale(model: nn.Module, initial: float, max_scale: float) -> nn.Parameter:
    """Give a SentenceTransformer the ``log_scale`` parameter :class:`EmbeddingModule` holds, for the Trainer.

    sentence-transformers' Trainer (and DeepSpeed under it) wraps, optimizes
    and checkpoints the SentenceTransformer itself, so the scale is registered
    on it: a parameter of the root module, in no submodule, so that
    ``model.save`` (which writes each submodule) leaves it out. A forward hook
    returns the clamped scale under ``LOGIT_SCALE`` beside the embedding,
    computed inside the forward as ``EmbeddingModule`` does (ZeRO-3 gathers a
    module's own parameters for its forward; the hook runs before DeepSpeed's
    own, which release them). A model that already carries one (an earlier
    Trainer's) keeps its value.
    """
    if "log_scale" not in model._parameters:
        model.register_parameter("log_scale", nn.Parameter(torch.tensor([float(initial)])))
    old = getattr(model, "log_scale_hook", None)
    if old is not None:
        old.remove()

    def add_scale(module: nn.Module, args: Any, output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output[LOGIT_SCALE] = logit_scale(module.log_scale, max_scale)
        return output

    model.log_scale_hook = model.register_forward_hook(add_scale, prepend=True)
    return model.log_scale


def detach_log_scale(model: nn.Module) -> None:
    """Take :func:`attach_log_scale`'s parameter and hook off a model (to train it on with a fixed temperature)."""
    hook = getattr(model, "log_scale_hook", None)
    if hook is not None:
        hook.remove()
        del model.log_scale_hook
    model._parameters.pop("log_scale", None)
