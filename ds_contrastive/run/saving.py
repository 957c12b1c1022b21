"""Writing a model: parameters ZeRO-3 has partitioned, without leaving any rank waiting; LoRA adapters merged."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..core.collectives import first_error
from ..errors import ConfigError


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


def lora_layers(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, layer) of every peft LoRA layer inside ``module``."""
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if hasattr(child, "lora_A") and hasattr(child, "get_base_layer")]


def merged_linear(layer: torch.nn.Module) -> torch.nn.Linear:
    """A plain ``nn.Linear`` holding a LoRA layer's base weight plus its active adapters' B·A·scaling (a copy)."""
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear:
        raise ConfigError(f"cannot save a merged model: LoRA on a {type(base).__name__} layer (only nn.Linear is "
                          "merged); target Linear modules only")
    active = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.lora_A]
    if any(layer.use_dora.get(a, False) for a in active):
        raise ConfigError("cannot save a merged model: DoRA adapters are not merged by ds_contrastive")
    weight = base.weight.detach().clone()
    for adapter in active:
        if adapter not in layer.merged_adapters:  # a merged adapter is in the base weight already
            weight += layer.get_delta_weight(adapter).detach().to(weight.dtype)
    merged = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device,
                             dtype=weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    return merged


@contextlib.contextmanager
def merged_adapters(model: torch.nn.Module) -> Iterator[None]:
    """Inside, ``model`` (a SentenceTransformer) is a plain model whose LoRA adapters are merged into its weights.

    A model wrapped with peft saves wrong otherwise: with the LoRA layers
    injected in place (``get_peft_model(model[0].auto_model, ...)``)
    transformers writes ``q_proj.base_layer.weight`` and ``lora_A`` keys,
    which ``SentenceTransformer(path)`` loads as a base model with those
    layers randomly initialised (a warning only); with a PeftModel as the
    module's model (``model[0].model = get_peft_model(...)``) it writes the
    adapter alone. Here each PeftModel is replaced by its base model and
    each LoRA layer by a plain Linear holding base + B·A·scaling, so the
    saved model loads without peft. Everything is put back on the way out;
    the trained parameters are never modified. Under ZeRO-3 call it with the
    parameters gathered (inside :func:`save_consolidated`).
    """
    unwrapped = [(module, module.model) for module in model.modules()
                 if hasattr(getattr(module, "model", None), "get_base_model")]  # a PeftModel as the module's model
    for module, peft_model in unwrapped:
        module.model = peft_model.get_base_model()
    swapped = []
    try:
        for parent, name, layer in lora_layers(model):
            setattr(parent, name, merged_linear(layer))
            swapped.append((parent, name, layer))
        yield
    finally:
        for parent, name, layer in swapped:
            setattr(parent, name, layer)
        for module, peft_model in unwrapped:
            module.model = peft_model
