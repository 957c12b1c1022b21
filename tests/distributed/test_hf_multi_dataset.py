"""ContrastiveTrainer on a sentence-transformers DatasetDict: 2 ranks, ZeRO 2 and 3.

Two datasets with different columns and hard-negative counts, each with its own
loss (InfoNCE; self-guided GIST) and prompt (sentence-transformers' per-dataset
forms). Every global batch comes from one dataset on every rank, PROPORTIONAL
gives each dataset its number of batches in an epoch (exactly: tolerance 0),
ROUND_ROBIN alternates; each step's update equals the single-process full-batch
reference of that dataset's batch under its loss; a run resumed from a Trainer
checkpoint continues the same datasets and batches to the same model; each
dataset's loss and accuracy are logged, and a DatasetDict eval gives each its
eval loss. (The worker: hf_multi_dataset_worker.py.)
"""

import pytest
from helpers import tiny_bert_dir
from jobs import run_worker


@pytest.mark.parametrize("stage", [2, 3])
def test_multi_dataset_trainer(stage, tmp_path):
    model = tiny_bert_dir(tmp_path, dropout=0.0)
    r = run_worker("hf_multi_dataset", 2, model, tmp_path, ["--stage", str(stage)], timeout=600)
    assert r["same_dataset_on_every_rank"] and r["shards_in_their_dataset"], r["datasets"]
    assert all(len(rows) == 2 and rows in ([3, 3], [1, 1]) for rows in r["rows_per_rank"]), r["rows_per_rank"]
    assert [1, 1] in r["rows_per_rank"], r["rows_per_rank"]  # qa's last global batch: 2 rows, one per rank
    # PROPORTIONAL over one epoch: each dataset's own number of global batches of 6 (26 rows: 5; 13 rows: 2, the
    # 13th row alone is fewer than the ranks), exactly
    assert r["counts"] == {"qa": 5, "nli": 2}, r["counts"]
    assert r["datasets"]["round_robin"] == ["qa", "nli", "qa", "nli"], r["datasets"]
    assert r["datasets"]["resumed"] == r["datasets"]["straight"][3:] and r["resumed_shards_equal"], r["datasets"]
    assert len(r["steps"]) == 11, r["steps"]  # 7 straight + 4 resumed, each against its reference
    for step in r["steps"]:
        assert step["moved"] > 1e-4, step
        assert step["vs_reference"] < 1e-5 and step["update_vs_reference"] < 1e-4, step
    assert r["resumed_vs_straight"] < 1e-6 and r["resumed_update_vs_straight"] < 1e-5, r
    for logged, step, dataset in zip(r["logged"], r["steps"], r["datasets"]["straight"]):
        assert abs(logged[f"{dataset}/loss"] - step["loss"]) < 1e-3 and f"{dataset}/accuracy" in logged, logged
        assert not [k for k in logged if "/" in k and not k.startswith(dataset)], logged  # the others: not this step
    assert set(r["evaluated"]) == {"eval_qa_loss", "eval_nli_loss"}, r["evaluated"]
    assert {"eval_qa_accuracy", "eval_nli_accuracy"} <= set(r["eval_logged"]), r["eval_logged"]
