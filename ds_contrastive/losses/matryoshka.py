"""Matryoshka training: one loss over several truncated embedding sizes, on the cached embeddings.

Truncation happens in the loss stage, on the gathered embeddings that pass 1
already produced, so the encoder runs exactly as often as without
Matryoshka: the gradients of every size are summed (with their weights) into
one cached gradient for pass 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .infonce import InfoNCE, LossResult


@dataclass
class Matryoshka:
    """``sum_k weight_k * loss(embeddings[..., :dim_k])``.

    Args:
        loss: any ds_contrastive loss (``InfoNCE``, ``GuidedInfoNCE``).
        dims: embedding sizes, for example (768, 512, 256, 128, 64); each at
            most the model's dimension.
        weights: one per size (default: all 1).
    """

    loss: InfoNCE
    dims: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.dims = tuple(int(d) for d in self.dims)
        self.weights = tuple(float(w) for w in self.weights) if self.weights is not None else (1.0,) * len(self.dims)
        if not self.dims or any(d < 1 for d in self.dims) or len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be distinct sizes >= 1, got {self.dims}")
        if len(self.weights) != len(self.dims):
            raise ValueError(f"{len(self.dims)} dims but {len(self.weights)} weights")

    def check_fits(self, size: int) -> None:
        """Refuse sizes larger than the model's embedding (``size``)."""
        too_large = [d for d in self.dims if d > size]
        if too_large:
            raise ValueError(f"Matryoshka dims {too_large} exceed the model's embedding size {size}")

    # The engine reads the temperature settings and the guide of the loss it wraps.
    def __getattr__(self, name: str):
        if name in ("temperature", "learnable_temperature", "max_scale", "initial_log_scale", "guide_model"):
            return getattr(self.loss, name)
        raise AttributeError(name)

    def compute(self, embeddings: torch.Tensor, hashes: torch.Tensor, first_row: int, rows: int, scale: float,
                guide: torch.Tensor | None = None) -> LossResult:
        self.check_fits(embeddings.shape[-1])
        if getattr(self.loss, "self_guided", False) and guide is None:
            guide = embeddings.detach()  # every size masks by the full embedding's similarities
        grad = torch.zeros_like(embeddings, dtype=torch.float32)
        grad_scale, sums = 0.0, {"loss": 0.0}
        for dim, weight in zip(self.dims, self.weights):
            part = self.loss.compute(embeddings[..., :dim], hashes, first_row, rows, scale, guide)
            grad[..., :dim] += weight * part.grad
            grad_scale += weight * part.grad_scale
            sums["loss"] += weight * part.sums["loss"]
            sums.update({f"{k}@{dim}": v for k, v in part.sums.items()})
        return LossResult(grad, grad_scale, sums)

    def summarize(self, sums: dict[str, float], n: int) -> dict[str, float]:
        """The weighted loss; loss and accuracy per size; other metrics of the largest size."""
        per_dim = {
            dim: self.loss.summarize({k.removesuffix(f"@{dim}"): v for k, v in sums.items() if k.endswith(f"@{dim}")}, n)
            for dim in self.dims
        }
        metrics = {**per_dim[max(self.dims)], "loss": sums["loss"] / n}
        for dim, part in per_dim.items():
            metrics[f"loss@{dim}"], metrics[f"accuracy@{dim}"] = part["loss"], part["accuracy"]
        return metrics


def check_dims(model: object, loss: InfoNCE | Matryoshka) -> None:
    """Refuse Matryoshka sizes larger than the model's embedding, before the first step (when the model says it)."""
    # sentence-transformers 6.2 renamed get_sentence_embedding_dimension (deprecated) to get_embedding_dimension
    getter = getattr(model, "get_embedding_dimension", None) or getattr(model, "get_sentence_embedding_dimension", None)
    size = getter() if getter else None
    if size and isinstance(loss, Matryoshka):
        loss.check_fits(size)
