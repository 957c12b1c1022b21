"""An end-of-sequence token on every text, for decoder embedders that pool the last token.

A decoder LLM sees each token only with what comes before it, so last-token
pooling reads the one position that has seen the whole text; e5-mistral,
gte-Qwen2 and Qwen3-Embedding train and embed with the EOS token in that
place. Many base tokenizers (Qwen2's, Mistral's) do not add it. Appending it
by hand in the training loop would leave the saved model's own
``encode`` without it; here the tokenizer itself is given it, as a post-
processor step, so training, ``SentenceTransformer(path).encode`` and the
saved ``tokenizer.json`` agree, and truncation keeps it (the tokenizer
reserves room for the tokens its post-processor adds).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError

APPEND_EOS = ("auto", "true", "false")


def pools_last_token(model: Any) -> bool:
    """Whether a SentenceTransformer pools its embedding from the last token."""
    for module in model:
        mode = getattr(module, "pooling_mode", None)
        if mode is not None and "lasttoken" in ((mode,) if isinstance(mode, str) else tuple(mode)):
            return True
    return False


def ends_with_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer already ends a text with its EOS token."""
    return tokenizer("a")["input_ids"][-1] == tokenizer.eos_token_id


def apply_append_eos(model: Any, option: str) -> bool:
    """Apply the ``append_eos`` option (auto / true / false) to a SentenceTransformer; True if its tokenizer changed.

    ``auto`` appends when the model pools the last token, its tokenizer has an
    EOS token and does not end texts with it already.
    """
    if option not in APPEND_EOS:
        raise ConfigError(f"append_eos must be one of {', '.join(APPEND_EOS)}, got {option!r}")
    tokenizer = model.tokenizer
    if option == "false" or (option == "auto" and not (pools_last_token(model)
                                                        and tokenizer.eos_token_id is not None)):
        return False
    if tokenizer.eos_token_id is not None and ends_with_eos(tokenizer):
        return False
    append_eos(tokenizer)
    return True


def append_eos(tokenizer: Any) -> None:
    """Make a fast tokenizer end every text with its EOS token (after whatever special tokens it adds already).

    Nothing changes if it does already. Setting ``add_bos_token`` or
    ``add_eos_token`` on a transformers tokenizer afterwards rebuilds its
    post-processor and drops this step.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"append_eos: the tokenizer ({type(tokenizer).__name__}) has no EOS token; set "
                          "tokenizer.eos_token or use append_eos false")
    if ends_with_eos(tokenizer):
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"append_eos needs a fast tokenizer; {type(tokenizer).__name__} is not one")
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    state["post_processor"] = with_eos(state.get("post_processor"), tokenizer.eos_token, tokenizer.eos_token_id)
    backend.post_processor = Tokenizer.from_str(json.dumps(state)).post_processor


def with_eos(post: dict[str, Any] | None, eos: str, eos_id: int) -> dict[str, Any]:
    """A post-processor (tokenizers' JSON form) that does what ``post`` does, then appends ``eos``."""
    special = {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}
    item = [{"SpecialToken": {"id": eos, "type_id": 0}}]
    pair_item = [{"SpecialToken": {"id": eos, "type_id": 1}}]
    if post is None:
        return {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}, *item],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, *item, {"Sequence": {"id": "B", "type_id": 1}},
                         *pair_item], "special_tokens": special}
    if post["type"] == "TemplateProcessing":  # [CLS] $A [SEP] -> [CLS] $A [SEP] eos
        return {**post, "single": post["single"] + item, "pair": post["pair"] + pair_item,
                "special_tokens": {**post["special_tokens"], **special}}
    if post["type"] == "Sequence":
        steps = post["processors"]
        last = max((i for i, p in enumerate(steps) if p["type"] == "TemplateProcessing"), default=None)
        if last is None:
            return {**post, "processors": [*steps, with_eos(None, eos, eos_id)]}
        return {**post, "processors": [*steps[:last], with_eos(steps[last], eos, eos_id), *steps[last + 1:]]}
    if post["type"] == "ByteLevel":  # offsets only: the template goes after it
        return {"type": "Sequence", "processors": [post, with_eos(None, eos, eos_id)]}
    raise ConfigError(f"append_eos: cannot extend the tokenizer's {post['type']} post-processor; end your texts "
                      "with the EOS token yourself and set append_eos false")
