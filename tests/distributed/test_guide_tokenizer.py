"""A guide whose tokenizer differs from the student's gets exactly its own ids from the raw strings.

The guide's vocabulary is cased, keeps accents and holds characters the
student's (uncased, accent-stripping) vocabulary lacks; the test texts are
ones the student's tokenizer changes. 2 ranks, ZeRO-2, two steps.
"""

import math

import pytest

from jobs import run_worker


@pytest.fixture(scope="module")
def per_rank(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("guide_tok")
    return run_worker("guide_tokenizer", 2, tiny_model_dir, work, ["--work", str(work)])


def test_guide_receives_its_own_tokenization(per_rank):
    for rank in per_rank:
        for step in rank["steps"]:
            assert step["guide_ids_exact"], step
            assert step["guide_calls_rows"] == step["texts"]  # each text embedded once by the guide
            assert step["student_changes_text"] >= step["texts"] // 2  # the inputs are the hard kind
            assert step["guide_round_trips"] == step["texts"]  # nothing was lost on the guide's side


def test_training_works_with_a_different_guide_tokenizer(per_rank):
    for rank in per_rank:
        assert rank["trained"]
        for step in rank["steps"]:
            assert math.isfinite(step["loss"]) and step["loss"] > 0
            assert 0 < step["masked_fraction"] < 11 / 12  # some in-batch candidates masked, not all of them
