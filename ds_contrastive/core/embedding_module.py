"""The module DeepSpeed wraps: the embedding model plus the loss's trainable scale."""

from __future__ import annotations

import torch
from torch import nn


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
        return embedding, self.log_scale.float().exp().clamp(max=self.max_scale)[0]
