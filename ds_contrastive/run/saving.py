"""Writing a model: parameters ZeRO-3 has partitioned, without leaving any rank waiting; LoRA merged or alone."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from ..core.collectives import first_error
from ..errors import ConfigError
from .adapters import adapter_config, adapter_tensors, check_savable, lora_layers, merged_weight, unwrapped_peft_models

# what a save writes of each transformer: LoRA merged in, the adapter alone, or the parameters as they are
WEIGHTS = ("merged", "adapter", "as_is")


def save_consolidated(model: torch.nn.Module, zero3: bool, writer: bool, write: Callable[[], None], where: str,
                      weights: str = "merged") -> None:
    """Run ``write`` on the writer rank with ``model``'s weights whole and in the form ``weights``; raise its failure
    on every rank.

    Collective: every rank must call it. ``weights``:

    * ``"merged"``: LoRA adapters merged into their base weights, a model that
      ``SentenceTransformer(path)`` loads without peft. Under ZeRO-3 each
      transformer is gathered one submodule at a time into a state dict on
      the writer's CPU: no device holds the whole model at once.
    * ``"adapter"``: each transformer with LoRA writes its adapter alone, as peft
      does (``adapter_config.json`` naming the base model, and
      ``adapter_model.safetensors``); ``SentenceTransformer(path)`` loads it
      onto that base model, with peft installed.
    * ``"as_is"``: the parameters as they are (the Trainer's checkpoints, which
      resume LoRA unmerged); ZeRO-3 gathers them all for the write.

    The rest of the model (pooling, dense layers: small) is gathered whole.
    A failure on the writer is sent to the others, which would otherwise wait
    forever in their next collective. Under ZeRO-3 the model card's example
    embeddings are left out (see :func:`no_card_inference`).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    error = None
    with unwrapped_peft_models(model) if weights != "as_is" else contextlib.nullcontext():
        inner = [] if weights == "as_is" else transformer_models(model)
        alone = [weights == "adapter" and bool(lora_layers(m)) for m in inner]  # the adapter alone, where one is
        check_layout(model, inner, alone, weights)  # refused alike on every rank, before any collective
        states = []
        for m, a in zip(inner, alone):  # a writer that failed copying goes on gathering: the others wait for it
            state, error = layerwise_state(m, zero3, writer and error is None, adapter_only=a)
            states.append(state)
        within = {id(p) for m in inner for p in m.parameters()}
        rest = [p for p in model.parameters() if id(p) not in within]
        writing = writer and error is None
        with gathered(rest, zero3), no_card_inference(model) if zero3 else contextlib.nullcontext(), \
                saving_states(inner, states, alone) if writing else contextlib.nullcontext() as saved:
            if writing:
                try:
                    write()
                    unsaved = [type(m).__name__ for m in inner if id(m) not in saved]
                    if unsaved:  # its parameters were never gathered for another way of writing them
                        raise RuntimeError(f"{', '.join(unsaved)} was not written with save_pretrained")
                except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                    error = f"{type(e).__name__}: {e}"
    error = first_error(f"saving to {where} failed: {error}" if error else None)
    if error:
        raise OSError(error)


def check_layout(model: torch.nn.Module, inner: list[torch.nn.Module], alone: list[bool], weights: str) -> None:
    """Refuse a save that would come out wrong: no adapter to save alone, LoRA outside a transformer, and the
    cases :func:`~ds_contrastive.run.adapters.check_savable` names."""
    if weights == "as_is":
        return
    if weights == "adapter" and not any(alone):
        raise ConfigError("save_adapter_only: the model has no LoRA adapters to save (set lora_rank)")
    inside = {id(layer) for m in inner for layer in lora_layers(m).values()}
    outside = [name for name, layer in lora_layers(model).items() if id(layer) not in inside]
    if outside:
        raise ConfigError(f"cannot save LoRA layers outside the transformer ({outside[:3]}): only the transformer's "
                          "LoRA layers are merged or saved alone")
    for m, a in zip(inner, alone):
        check_savable(m, a)


def gathered(params: Iterable[torch.nn.Parameter], zero3: bool) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, ``params`` whole on every rank for the duration (read only); otherwise nothing to do."""
    params = list(params)
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def transformer_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost transformers models inside a SentenceTransformer, in module order."""
    from transformers import PreTrainedModel

    found: dict[int, torch.nn.Module] = {}

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(child, PreTrainedModel):
                found.setdefault(id(child), child)
            else:
                visit(child)

    visit(model)
    return list(found.values())


def layerwise_state(model: torch.nn.Module, zero3: bool, writer: bool, adapter_only: bool
                    ) -> tuple[dict[str, torch.Tensor], str | None]:
    """``model``'s weights for a save, on the writer's CPU: LoRA layers merged, or (``adapter_only``) the adapters;
    and the writer's error, if copying failed (host memory).

    Collective under ZeRO-3: each submodule's parameters are gathered in
    turn, copied by the writer, and released, so the device holds one
    submodule whole at a time. A writer whose copy fails stops copying but
    goes on gathering, so that no rank waits for it; the caller raises the
    error on every rank.
    """
    lora = lora_layers(model)
    inside_lora = tuple(f"{name}." for name in lora)
    state: dict[str, torch.Tensor] = {}
    error = None
    for name, module in model.named_modules():
        if name.startswith(inside_lora):
            continue
        key = f"{name}." if name else ""
        params = module.parameters() if name in lora else module.parameters(recurse=False)
        if adapter_only and name not in lora:
            continue
        with gathered(params, zero3):
            if not writer or error is not None:
                continue
            try:
                state.update({k: v.to("cpu", copy=True) for k, v in own_tensors(module, key, name in lora,
                                                                                 adapter_only).items()})
            except Exception as e:  # noqa: BLE001 - raised on every rank by the caller
                error, state = f"copying {name or type(model).__name__} to the CPU: {type(e).__name__}: {e}", {}
    return state, error


def own_tensors(module: torch.nn.Module, key: str, lora: bool, adapter_only: bool) -> dict[str, torch.Tensor]:
    """What a submodule adds to the saved state: a LoRA layer's merged weight (or its adapter), else its own
    parameters and persistent buffers. Its parameters must be whole (gathered)."""
    if lora and adapter_only:
        return adapter_tensors(key.removesuffix("."), module)
    if lora:
        base = module.get_base_layer()
        tensors = {f"{key}weight": merged_weight(module)}
        if base.bias is not None:
            tensors[f"{key}bias"] = base.bias.detach()
        return tensors
    tensors = {key + n: p.detach() for n, p in module.named_parameters(recurse=False)}
    tensors.update({key + n: b.detach() for n, b in module.named_buffers(recurse=False)
                    if n not in module._non_persistent_buffers_set})
    return tensors


@contextlib.contextmanager
def saving_states(models: list[torch.nn.Module], states: list[dict[str, torch.Tensor]], adapter_only: list[bool]
                  ) -> Iterator[set[int]]:
    """Inside, each transformer's ``save_pretrained`` writes its given state: the model, or peft's adapter files.

    sentence-transformers saves a transformer with ``save_pretrained``; here
    that call writes the state dict made by :func:`layerwise_state` instead
    of the live parameters (partitioned under ZeRO-3, unmerged with LoRA).
    Yields the ids of the models written so far. The keys are written as
    they are (``save_original_format=False``): a model transformers loaded
    with an adapter would otherwise have them renamed for peft. A model
    transformers itself gave adapters (``_hf_peft_config_loaded``) is written
    whole: transformers would otherwise write its adapter alone.
    """
    saved: set[int] = set()

    def writer(model: torch.nn.Module, state: dict[str, torch.Tensor], alone: bool) -> Callable[..., None]:
        def save_pretrained(save_directory: str, **kwargs: object) -> None:
            if alone:
                write_adapter(model, state, save_directory)
            else:
                type(model).save_pretrained(model, save_directory, **{**kwargs, "state_dict": state,
                                                                       "save_original_format": False})
            saved.add(id(model))
        return save_pretrained

    patched = []
    for model, state, alone in zip(models, states, adapter_only):
        patched.append((model, model.__dict__.get("save_pretrained"), model.__dict__.get("_hf_peft_config_loaded")))
        model.save_pretrained = writer(model, state, alone)
        if not alone:
            model._hf_peft_config_loaded = False
    try:
        yield saved
    finally:
        for model, method, flag in patched:
            for name, before in (("save_pretrained", method), ("_hf_peft_config_loaded", flag)):
                if before is None:
                    model.__dict__.pop(name, None)
                else:
                    model.__dict__[name] = before


def write_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], save_directory: str, **_: object) -> None:
    """peft's adapter files for ``model`` in ``save_directory``: its LoraConfig (naming the base model) and weights."""
    from safetensors.torch import save_file

    config = copy.copy(adapter_config(model))
    config.inference_mode = True  # as peft writes it: the loaded adapter is for use, not further training
    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)
    save_file(state, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})


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
