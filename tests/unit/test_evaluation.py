"""The held-out evaluation's pieces in one process: shares of the pairs, and which best model a resumed run keeps.

The sharded metrics themselves are compared with a single-process evaluation
of the saved model in ``test_train_e2e.py`` (2 ranks, uneven shares), and the
best model across a kill and resume in ``test_resume.py``.
"""

import json

import pytest

from ds_contrastive.data.files import columns_digest
from ds_contrastive.errors import DataError
from ds_contrastive.run.config import TrainConfig
from ds_contrastive.run.evaluation import Evaluation, eval_share, replace_directory

PAIRS = {"anchor": [f"q{i}" for i in range(13)], "positive": [f"d{i}" for i in range(13)]}


def test_shares_cover_the_pairs_once_in_rank_order():
    shares = [eval_share(PAIRS, rank, 3) for rank in range(3)]
    assert [len(q) for q, _ in shares] == [5, 4, 4]  # the first ranks take the extra pair, as global batches do
    assert sum((q for q, _ in shares), []) == PAIRS["anchor"] and sum((d for _, d in shares), []) == PAIRS["positive"]
    with pytest.raises(DataError, match="13 held-out pairs cannot be split over 16 ranks"):
        eval_share(PAIRS, 0, 16)


def best_record(**changes):
    return {"step": 4, "metric": "ndcg@10", "value": 0.5, "metrics": {"ndcg@10": 0.5}, "pairs": columns_digest(PAIRS),
            **changes}


@pytest.mark.parametrize("saved, on_disk, kept", [
    (best_record(), best_record(), True),
    (best_record(), best_record(step=8, value=0.6), False),  # the interrupted run replaced it after the checkpoint
    (best_record(), None, False),  # output_dir/best is gone
    (best_record(metric="mrr@10"), best_record(metric="mrr@10"), False),  # now chosen by another metric
    (best_record(pairs="0123456789abcdef"), best_record(pairs="0123456789abcdef"), False),  # other held-out pairs
])
def test_a_resumed_run_keeps_its_checkpoints_best_only_if_it_is_still_there_and_comparable(tmp_path, saved, on_disk,
                                                                                            kept):
    if on_disk is not None:
        (tmp_path / "best").mkdir()
        (tmp_path / "best" / "eval.json").write_text(json.dumps(on_disk))
    cfg = TrainConfig(output_dir=str(tmp_path), eval_every_steps=4, best_metric="ndcg@10")
    assert Evaluation(cfg, PAIRS, 0, 1, saved).best == (saved if kept else None)


def test_replace_directory_swaps_the_new_one_in(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "old.txt").write_text("old")
    (tmp_path / "best.old").mkdir()  # left by a kill between the two renames of an earlier swap
    (tmp_path / "best.partial").mkdir()
    (tmp_path / "best.partial" / "new.txt").write_text("new")
    replace_directory(tmp_path / "best.partial", tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["new.txt"]
    (tmp_path / "fresh.partial").mkdir()
    replace_directory(tmp_path / "fresh.partial", tmp_path / "fresh")  # nothing to replace yet
    assert (tmp_path / "fresh").is_dir() and not (tmp_path / "fresh.partial").exists()
