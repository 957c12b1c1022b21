"""Writing a model whose parameters ZeRO-3 has partitioned, without leaving any rank waiting."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..core.collectives import first_error


def save_consolidated(params: list[torch.nn.Parameter], zero3: bool, writer: bool, write: Callable[[], None],
                      where: str, model: object = None) -> None:
    """Run ``write`` on the writer rank with every parameter whole; raise its failure on every rank.

    Collective: every rank must call it. Under ZeRO-3 each rank holds only a
    slice of each parameter, so every rank gathers the full parameters for the
    duration of the write (enough up to a few billion parameters). A failure on
    the writer is sent to the others, which would otherwise wait forever in
    their next collective. ``model`` (a SentenceTransformer) is saved without
    its model card's example embeddings under ZeRO-3 (see :func:`no_card_inference`).
    """
    import deepspeed

    gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    error = None
    with gathered, no_card_inference(model) if zero3 else contextlib.nullcontext():
        if writer:
            try:
                write()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error = f"saving to {where} failed: {type(e).__name__}: {e}"
    error = first_error(error)
    if error:
        raise OSError(error)


@contextlib.contextmanager
def no_card_inference(model: object) -> Iterator[None]:
    """Save without the model card's usage snippet, which embeds example sentences.

    sentence-transformers encodes a few sentences while writing the model
    card. Under ZeRO-3 a forward is collective (DeepSpeed's hooks gather and
    check across ranks), and only the writing rank runs it: the ranks wait
    for each other forever.
    """
    card = getattr(model, "model_card_data", None)
    if card is None or not hasattr(card, "generate_widget_examples"):
        yield
        return
    before, card.generate_widget_examples = card.generate_widget_examples, False
    try:
        yield
    finally:
        card.generate_widget_examples = before
