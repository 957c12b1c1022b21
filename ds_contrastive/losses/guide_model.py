"""The frozen guide model of guided (GIST-style) losses.

The guide is inference-only: it is never handed to ``deepspeed.initialize``
(so it is neither wrapped nor partitioned by ZeRO-3), its parameters never
require grad, and it runs in bf16 on a GPU and fp32 on a CPU. It tokenizes the
*raw strings* with its own tokenizer — never ids decoded from the student's
tokenizer, which loses casing, accents and characters outside the student's
vocabulary — and embeds them in length-sorted chunks under its own token
budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..core.chunks import plan_chunks
from ..core.shard import tokenize, tokenizer_settings


@contextlib.contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Load a model whole even while a Hugging Face ZeRO-3 config is active.

    Creating ``TrainingArguments(deepspeed=<ZeRO-3 config>)`` makes every later
    ``from_pretrained`` partition the weights at load time (``zero.Init``): right
    for the student, wrong for a guide that never enters a DeepSpeed engine.
    transformers keeps that config in a module-level weak reference; it is
    cleared for the load and restored after.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


class Guide:
    """A frozen SentenceTransformer that embeds raw text in pass 1 only.

    Args:
        model: a ``SentenceTransformer`` or a path to one.
        chunk_tokens: padded-token budget of one guide forward call.
        max_length: truncation (default: the guide's ``max_seq_length``).
    """

    def __init__(self, model: object, chunk_tokens: int = 16384, max_length: int | None = None) -> None:
        if isinstance(model, (str, Path)):
            from sentence_transformers import SentenceTransformer

            with outside_zero3_init():
                model = SentenceTransformer(str(model), device="cpu", trust_remote_code=False)
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ValueError(
                "the guide model was partitioned by DeepSpeed ZeRO-3 when it was loaded (a Hugging Face "
                "TrainingArguments with a ZeRO-3 config existed): pass the guide's path instead, or load it first")
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.max_length, self.lowercase = tokenizer_settings(model, max_length)
        self.device: torch.device | None = None
        self.model.eval()
        self.model.requires_grad_(False)

    def to(self, device: torch.device) -> Guide:
        """Move to the training device: bf16 on an accelerator, fp32 on the CPU."""
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.model.to(device=device, dtype=dtype)
        self.device = device
        return self

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """fp32 embeddings [len(texts), dim] of the raw strings, from the guide's own tokenization."""
        device = self.device or torch.device("cpu")
        tokens = tokenize(self.model.tokenizer, texts, self.max_length, self.lowercase)
        out: torch.Tensor | None = None
        for chunk in plan_chunks(tokens.lengths, self.chunk_tokens, None).chunks:
            emb = self.model(tokens.features(chunk.indices, device))["sentence_embedding"].float()
            if out is None:
                out = emb.new_empty((len(texts), emb.shape[-1]))
            out[list(chunk.indices)] = emb
        return out
