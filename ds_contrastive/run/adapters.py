"""peft LoRA adapters as a saved model sees them: the layers, their merged weights, the adapter alone.

Two ways of wrapping a SentenceTransformer with peft reach the engine: LoRA
layers injected in place (``peft.get_peft_model(model[0].auto_model, ...)``,
also what ``lora_rank`` does) and a ``PeftModel`` as the module's model
(``model[0].model = peft.get_peft_model(...)``). Both hold the same layers;
:func:`unwrapped_peft_models` makes the second look like the first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import ConfigError


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every peft LoRA layer inside ``module``, by its qualified name."""
    return {name: child for name, child in module.named_modules() if hasattr(child, "lora_A")
            and hasattr(child, "get_base_layer")}


def active_adapter(layer: torch.nn.Module) -> str | None:
    """The one adapter a LoRA layer applies (None: disabled, or already merged into the base weight).

    Only plain LoRA on an ``nn.Linear`` is written: a variant (DoRA, aLoRA,
    ...) merges differently, a trained LoRA bias and embedding adapters are
    held elsewhere; they are refused rather than saved wrong.
    """
    active = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) > 1:
        raise ConfigError(f"cannot save a model with several active LoRA adapters ({active}): activate one")
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear:
        raise ConfigError(f"cannot save LoRA on a {type(base).__name__} layer (only nn.Linear layers are merged or "
                          "saved alone): target Linear modules only")
    if not active:
        return None
    adapter = active[0]
    if layer.use_dora.get(adapter, False) or adapter in getattr(layer, "lora_variant", {}):
        raise ConfigError(f"cannot save adapter {adapter!r}: it is a LoRA variant (DoRA, aLoRA, ...), which "
                          "ds_contrastive does not merge; use plain LoRA")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ConfigError(f"cannot save adapter {adapter!r}: it trains a LoRA bias (lora_bias=True), which "
                          "ds_contrastive does not write; use lora_bias=False")
    return adapter if adapter not in layer.merged_adapters else None


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A copy of a LoRA layer's base weight plus its active adapter's B·A·scaling, summed in fp32."""
    adapter = active_adapter(layer)
    base = layer.get_base_layer()
    weight = base.weight.detach().float()
    if adapter is not None:
        weight = weight + layer.get_delta_weight(adapter).detach().float()
    return weight.to(base.weight.dtype)


def adapter_tensors(name: str, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's A and B of the layer at ``name``, under the keys peft's own adapter files use."""
    adapter = active_adapter(layer)
    if adapter is None:
        return {}
    return {f"base_model.model.{name}.lora_{part}.weight": getattr(layer, f"lora_{part}")[adapter].weight.detach()
            for part in ("A", "B")}


def check_savable(model: torch.nn.Module, adapter_only: bool) -> None:
    """Refuse, before any collective, what a save would write wrong: wrapped modules, adapters held elsewhere.

    peft's ``modules_to_save`` keeps a trained copy beside the original
    module (neither merged nor in the adapter files here); ``bias`` other
    than ``"none"`` trains base biases, which an adapter-only save would lose.
    """
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "original_module") and hasattr(m, "modules_to_save")]
    if wrapped:
        raise ConfigError(f"cannot save a model with peft modules_to_save ({wrapped[:3]}): ds_contrastive merges "
                          "LoRA layers only; train those modules without modules_to_save")
    for layer in lora_layers(model).values():
        active_adapter(layer)
    if adapter_only and getattr(adapter_config(model), "bias", "none") != "none":
        raise ConfigError("save_adapter_only: the adapter trains base biases (bias != 'none'), which peft's adapter "
                          "files here would not hold; save the merged model")


def adapter_config(model: torch.nn.Module) -> object:
    """The LoraConfig of the (one) active adapter of a model peft adapted in place."""
    configs = getattr(model, "peft_config", None) or {}
    active = {a for layer in lora_layers(model).values() if (a := active_adapter(layer)) is not None}
    if len(active) != 1 or next(iter(active)) not in configs:
        raise ConfigError(f"cannot save the adapter alone: {type(model).__name__} has active LoRA adapters "
                          f"{sorted(active)} and adapter configs {sorted(configs)}; it needs exactly one of each")
    return configs[next(iter(active))]


@contextlib.contextmanager
def unwrapped_peft_models(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every module whose ``model`` is a PeftModel holds peft's base model instead (the LoRA layers stay).

    sentence-transformers saves a PeftModel as its adapter alone; its base
    model, with the LoRA layers injected, saves like any transformer.
    """
    unwrapped = [(module, module.model) for module in model.modules()
                 if hasattr(getattr(module, "model", None), "get_base_model")]
    for module, peft_model in unwrapped:
        module.model = peft_model.get_base_model()
    try:
        yield
    finally:
        for module, peft_model in unwrapped:
            module.model = peft_model
