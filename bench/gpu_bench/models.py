"""The encoders both sides train: random-init BERTs of three shapes with MiniLM's tokenizer, as SentenceTransformers.

Only MiniLM's tokenizer and BERT config are needed (no weights reach the GPU machine): the weights
are random (seed 0), dropout 0.1 as in BERT's config, max_seq_length 512, mean pooling. Smoke mode
builds tiny shapes of the same names. Each shape is built once per work folder and loaded from there
by every part.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SHAPES = {
    "minilm": dict(hidden=384, layers=6, heads=12, ffn=1536),
    "bert-base": dict(hidden=768, layers=12, heads=12, ffn=3072),
    "bert-large": dict(hidden=1024, layers=24, heads=16, ffn=4096),
}
SMOKE_SHAPES = {
    "minilm": dict(hidden=64, layers=2, heads=4, ffn=128),
    "bert-base": dict(hidden=96, layers=2, heads=4, ffn=192),
    "bert-large": dict(hidden=128, layers=3, heads=4, ffn=256),
}


def st_modules() -> tuple[type, type]:
    """sentence-transformers' Transformer and Pooling modules, where the installed version keeps them."""
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    return Transformer, Pooling


def build_model_dir(root: Path, name: str, shape: dict, tokenizer_dir: Path) -> Path:
    """A random-init (seed 0) BERT of ``shape`` with MiniLM's tokenizer, saved as a SentenceTransformer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = root / f"{name}-{shape['hidden']}x{shape['layers']}"
    if (path / "modules.json").exists():
        return path
    raw = root / f"raw-{path.name}"
    config = BertConfig.from_pretrained(str(tokenizer_dir))
    config.update(dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], intermediate_size=shape["ffn"],
                       max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(raw))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(raw))
    Transformer, Pooling = st_modules()
    model = SentenceTransformer(modules=[Transformer(str(raw), max_seq_length=512), Pooling(shape["hidden"], "mean")],
                                device="cpu")
    model.save(str(path))
    shutil.rmtree(raw)
    return path


def load_st(path: Path, device: str):
    """The saved encoder as a SentenceTransformer on ``device`` (each part loads its own copy)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)
