"""The built-in stdlib docstring dataset: determinism, filters, split and JSONL output."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ds_contrastive.data.stdlib_pairs import (
    MAX_REST_CHARS,
    docstring_pair,
    stdlib_pairs,
    train_heldout_split,
    write_jsonl,
)

MODULE_FILE = Path(__file__).resolve().parents[2] / "ds_contrastive" / "data" / "stdlib_pairs.py"


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return stdlib_pairs()


def test_deterministic_within_a_process(pairs):
    assert stdlib_pairs() == pairs


def test_deterministic_across_processes_with_another_hash_seed(pairs):
    """A fresh interpreter with a different str-hash salt builds the same list (loads the file alone, no torch)."""
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('stdlib_pairs', {str(MODULE_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "json.dump(module.stdlib_pairs(), sys.stdout)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert [tuple(p) for p in json.loads(out)] == pairs


def test_size_and_filters(pairs):
    assert len(pairs) >= 1000
    for summary, rest in pairs:
        assert 4 <= len(summary.split()) <= 40
        assert len(rest.split()) >= 12
        assert len(rest) <= MAX_REST_CHARS
        for text in (summary, rest):
            assert text == " ".join(text.split())  # one line, single spaces
    assert len({s for s, _ in pairs}) == len(pairs)
    assert len({r for _, r in pairs}) == len(pairs)


def test_max_pairs_is_a_prefix(pairs):
    assert stdlib_pairs(max_pairs=25) == pairs[:25]


def test_contains_a_known_stdlib_docstring(pairs):
    summary, rest = next(p for p in pairs if p[0] == "Return the median (middle value) of numeric data.")
    assert rest.startswith("When the number of data points is odd, return the middle data point.")


def test_docstring_pair_splits_on_the_first_blank_line():
    doc = "Return the frobnicated value of x.\n\nThe frobnication is done in place,\nand the result is cached for the next twelve calls at least."
    assert docstring_pair(doc) == (
        "Return the frobnicated value of x.",
        "The frobnication is done in place, and the result is cached for the next twelve calls at least.",
    )


def test_docstring_pair_skips_a_signature_paragraph_and_splits_an_unseparated_summary():
    doc = "S.frob(x) -> int\n\nReturn the frob count of x. Counting starts at the\nfirst frob and stops at the last one that is seen in x."
    assert docstring_pair(doc) == (
        "Return the frob count of x.",
        "Counting starts at the first frob and stops at the last one that is seen in x.",
    )


@pytest.mark.parametrize(
    "doc",
    [
        "Short.\n\nThis rest has more than twelve words in it, so only the summary is too short.",
        "A summary of enough words.\n\nBut the rest is short.",
        "A single sentence docstring with no rest at all",
        " ".join(["word"] * 41) + "\n\n" + " ".join(["rest"] * 20),
    ],
)
def test_docstring_pair_rejects(doc):
    assert docstring_pair(doc) is None


def test_rest_is_truncated_at_a_word_boundary():
    words = [f"w{i}" for i in range(600)]
    full = " ".join(words)
    _, rest = docstring_pair("A summary of four words.\n\n" + full)
    assert MAX_REST_CHARS - 10 < len(rest) <= MAX_REST_CHARS
    assert full.startswith(rest) and full[len(rest)] == " "


def test_split_is_disjoint_complete_and_sized(pairs):
    train, heldout = train_heldout_split(pairs, heldout_fraction=0.1)
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == sorted(pairs)
    assert 0.06 < len(heldout) / len(pairs) < 0.14


def test_split_does_not_depend_on_input_order(pairs):
    shuffled = list(pairs)
    random.Random(0).shuffle(shuffled)
    train, heldout = train_heldout_split(pairs)
    shuffled_train, shuffled_heldout = train_heldout_split(shuffled)
    assert set(shuffled_train) == set(train) and set(shuffled_heldout) == set(heldout)
    prefix = set(pairs[:300])
    assert train_heldout_split(pairs[:300])[1] == [p for p in heldout if p in prefix]


def test_split_seed_and_extremes(pairs):
    assert train_heldout_split(pairs, seed=1)[1] != train_heldout_split(pairs, seed=0)[1]
    assert train_heldout_split(pairs, heldout_fraction=0.0) == (pairs, [])
    assert train_heldout_split(pairs, heldout_fraction=1.0) == ([], pairs)
    with pytest.raises(ValueError):
        train_heldout_split(pairs, heldout_fraction=1.5)


def test_write_jsonl(tmp_path):
    rows = [("Résumé of a thing.", "Rest with ünïcode — and a \"quote\"."), ("Second.", "Line\nbreak.")]
    write_jsonl(rows, tmp_path / "a.jsonl")
    write_jsonl(rows, tmp_path / "b.jsonl", anchor="query", positive="document")
    lines_a = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    lines_b = (tmp_path / "b.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines_a] == [{"anchor": a, "positive": p} for a, p in rows]
    assert [json.loads(line) for line in lines_b] == [{"query": a, "document": p} for a, p in rows]
    assert "Résumé" in lines_a[0]  # written as UTF-8 text, not \u escapes
