"""Global batches under ContrastiveTrainer: one draw for all ranks, each rank a contiguous share.

The samplers alone (no process group): every rank's shares of a global batch
partition it; a dataset's last batch with fewer rows than ranks is left out and
counted out of the length; the weighted draw follows its weights and its seed;
and the Trainer's loader gives PROPORTIONAL batches in the number each dataset
has and ROUND_ROBIN batches alternating. (Across real ranks:
tests/distributed/test_hf_multi_dataset.py.)
"""

import functools
from collections import Counter

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import corpus, load_model
from sentence_transformers import SentenceTransformerTrainingArguments
from torch.utils.data import BatchSampler, ConcatDataset, RandomSampler, SequentialSampler

import ds_contrastive as dc
from ds_contrastive.hf.batches import AtLeastRows, RankShare, WeightedBatchSampler


@pytest.mark.parametrize("rows, size, ranks", [(13, 6, 2), (14, 6, 3), (10, 5, 4), (12, 12, 3)])
def test_rank_shares_partition_each_global_batch(rows, size, ranks):
    batches = AtLeastRows(BatchSampler(SequentialSampler(range(rows)), size, drop_last=False), rows, ranks)
    shares = [list(RankShare(batches, r, ranks, torch.Generator(), 0)) for r in range(ranks)]
    want = [b for b in BatchSampler(SequentialSampler(range(rows)), size, drop_last=False) if len(b) >= ranks]
    assert all(len(s) == len(want) == len(batches) for s in shares)  # every rank takes every step
    for step, batch in enumerate(want):
        parts = [s[step] for s in shares]
        assert sum(parts, []) == batch  # contiguous, in rank order, nothing lost or repeated
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    assert len(want) == rows // size + (rows % size >= ranks)


def test_weighted_draw_follows_weights_and_seed():
    parts = [Dataset.from_dict({"x": list(range(n))}) for n in (400, 400)]
    samplers = [BatchSampler(RandomSampler(p, generator=torch.Generator().manual_seed(0)), 4, False) for p in parts]
    sampler = WeightedBatchSampler(ConcatDataset(parts), samplers, weights=[3, 1], seed=5)
    first = list(sampler)
    assert len(first) == len(sampler) == 200
    counts = Counter(int(b[0] >= 400) for b in first)
    assert abs(counts[0] / 200 - 0.75) < 0.1, counts  # 3:1 within 0.1 (binomial sd 0.031)
    assert [b[0] >= 400 for b in list(sampler)] == [b[0] >= 400 for b in first]  # same seed and epoch: same draw
    sampler.set_epoch(1)
    assert [b[0] >= 400 for b in list(sampler)] != [b[0] >= 400 for b in first]
    with pytest.raises(ValueError, match="one weight > 0 per dataset"):
        WeightedBatchSampler(ConcatDataset(parts), samplers, weights=[1])


@pytest.mark.parametrize("order", ["proportional", "round_robin"])
def test_trainer_loader_draws_one_dataset_per_batch(tiny_model_dir, tmp_path, order):
    sizes = {"big": 30, "small": 12}  # batches of 6: 5 and 2
    data = DatasetDict({name: Dataset.from_dict(corpus(n, 0, seed=i)) for i, (name, n) in enumerate(sizes.items())})
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, seed=1,
                                                multi_dataset_batch_sampler=order, report_to="none", use_cpu=True)
    trainer = dc.ContrastiveTrainer(model=load_model(tiny_model_dir), args=args, train_dataset=data)
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    names = [b["dataset_name"] for b in batches]
    for b in batches:  # every row of a batch from the dataset it names
        assert all(t.startswith("query") for t in b["anchor"]) and len(b["anchor"]) == 6
        rows = set(data[b["dataset_name"]]["anchor"])
        assert set(b["anchor"]) <= rows
    if order == "proportional":  # every batch of each dataset once per epoch, in a seeded order
        assert Counter(names) == {"big": 5, "small": 2} and len(loader) == 7, names
    else:  # alternating until the smaller dataset is used up
        assert names == ["big", "small", "big", "small"] and len(loader) == 4, names
    assert names == [b["dataset_name"] for b in trainer.get_train_dataloader()]  # seeded: the same again
    # an epoch's batches depend on the seed and the epoch alone: epoch 1 drawn first (a resume in epoch 1) or after
    # epoch 0 is the same, and differs from epoch 0
    first = trainer.get_train_dataloader()
    list(first)
    first.set_epoch(1)
    fresh = trainer.get_train_dataloader()
    fresh.set_epoch(1)
    epoch1 = [b["anchor"] for b in fresh]
    assert [b["anchor"] for b in first] == epoch1 != [b["anchor"] for b in batches]


def test_weighted_sampler_as_the_trainers_multi_dataset_sampler(tiny_model_dir, tmp_path):
    data = DatasetDict({"a": Dataset.from_dict(corpus(24, 0, seed=1)), "b": Dataset.from_dict(corpus(24, 0, seed=2))})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, seed=1, report_to="none", use_cpu=True,
        multi_dataset_batch_sampler=functools.partial(WeightedBatchSampler, weights=[1.0, 1e-9]))
    trainer = dc.ContrastiveTrainer(model=load_model(tiny_model_dir), args=args, train_dataset=data)
    names = [b["dataset_name"] for b in trainer.get_train_dataloader()]
    assert names == ["a"] * 24, names  # "a" drawn every time, its order restarted after its 12 batches
