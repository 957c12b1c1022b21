"""Decoder embedders: the last real token is pooled whatever the padding side, and EOS ends every text where needed.

A base LLM tokenizer (Qwen2's, Mistral's) does not end a text with its EOS token, while last-token embedders
train and embed with it there. ``append_eos`` gives the tokenizer itself that step: the engine, the saved
model's ``encode`` and its ``tokenizer.json`` agree, and truncation keeps the EOS.
"""

import pytest
import torch
from helpers import corpus, load_model, tiny_bert_dir, tiny_decoder_dir

import ds_contrastive as dc
from ds_contrastive.core.shard import tokenize
from ds_contrastive.errors import ConfigError
from ds_contrastive.run.config import load_train_config
from ds_contrastive.run.eos import append_eos, apply_append_eos
from ds_contrastive.run.setup import build_model


def rows(tokens) -> list[list[int]]:
    """Each text's token ids as the engine holds them."""
    return [tokens.padded([i])["input_ids"][0].tolist() for i in range(len(tokens))]


TEXTS = ["query 1 alpha beta", "doc 2 river mountain storm quiet engine paper garden", "neg0 3 stone"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_engines_chunks_pool_the_last_real_token_on_either_padding_side(side, tmp_path):
    model = load_model(tiny_decoder_dir(tmp_path, "qwen2"))
    model.tokenizer.padding_side = side
    model.eval()
    tokens = tokenize(model.tokenizer, TEXTS, max_length=64)
    assert len(set(tokens.lengths)) == len(TEXTS)  # one chunk pads the shorter texts
    with torch.no_grad():
        chunk = model(tokens.padded(range(len(TEXTS))))["sentence_embedding"]  # the engine's own padding
        alone = torch.stack([model.encode([t], convert_to_tensor=True)[0] for t in TEXTS])  # no padding at all
    assert float((chunk - alone).abs().max()) < 1e-5


def test_auto_appends_eos_for_last_token_pooling_and_the_saved_model_keeps_it(tmp_path):
    cfg = load_train_config(None, {"model": str(tiny_decoder_dir(tmp_path, "qwen2", tokenizer="bytes"))})
    assert cfg.append_eos == "auto"
    model, appended = build_model(cfg, seed=0)
    assert appended
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    ids = rows(tokenize(tokenizer, TEXTS, max_length=64))
    assert all(row[-1] == eos and eos not in row[:-1] for row in ids), ids
    cut = tokenize(tokenizer, [TEXTS[1]], max_length=4)
    assert rows(cut)[0][-1] == eos and cut.lengths == [4] and cut.truncated == 1  # truncation keeps the EOS

    engine = dc.ContrastiveEngine(model, dc.InfoNCE(), chunk_rows=4, lr=1e-2)
    engine.train_step(corpus(8, 1, seed=2))
    engine.save(tmp_path / "saved")
    saved = load_model(tmp_path / "saved")
    assert saved.tokenizer(TEXTS[0])["input_ids"][-1] == eos
    model.eval()
    with torch.no_grad():
        assert float((saved.encode(TEXTS, convert_to_tensor=True) - model.encode(TEXTS, convert_to_tensor=True))
                     .abs().max()) < 1e-5


def test_eos_follows_the_special_tokens_a_tokenizer_adds_already(tmp_path):
    model = load_model(tiny_decoder_dir(tmp_path, "qwen2"))
    tokenizer = model.tokenizer
    tokenizer.eos_token = "[unused0]"  # MiniLM's tokenizer: [CLS] text [SEP]; this EOS is not added
    assert apply_append_eos(model, "auto")
    ids = tokenizer("alpha beta")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-2:] == [tokenizer.sep_token_id, tokenizer.eos_token_id]
    assert tokenizer("alpha beta gamma delta", truncation=True, max_length=4)["input_ids"][-1] == tokenizer.eos_token_id
    assert not apply_append_eos(model, "true")  # once is enough: it ends with EOS now


def test_auto_leaves_other_models_alone_and_refusals_name_the_problem(tmp_path):
    bert = load_model(tiny_bert_dir(tmp_path))  # mean pooling
    bert.tokenizer.eos_token = "[unused0]"
    assert not apply_append_eos(bert, "auto")
    assert bert.tokenizer("alpha")["input_ids"][-1] == bert.tokenizer.sep_token_id
    decoder = load_model(tiny_decoder_dir(tmp_path, "llama"))
    assert decoder.tokenizer.eos_token_id is None  # MiniLM's (loaded as itself beside a Llama): no EOS token
    assert not apply_append_eos(decoder, "auto")
    with pytest.raises(ConfigError, match="has no EOS token"):
        apply_append_eos(decoder, "true")
    with pytest.raises(ConfigError, match="append_eos must be one of auto, true, false, got 'yes'"):
        apply_append_eos(decoder, "yes")
    with pytest.raises(ConfigError, match="has no EOS token"):
        append_eos(decoder.tokenizer)
