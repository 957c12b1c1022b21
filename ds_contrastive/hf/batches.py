"""Global batches for ContrastiveTrainer: drawn once for all ranks, each rank reading its share.

A contrastive step's negatives are the whole global batch, so the batch must
be chosen globally. Hugging Face's Trainer (through accelerate) instead hands
each rank every ``world``-th per-device batch of the sampler: with several
datasets, consecutive batches come from different datasets and one step
would mix them (InfoNCE's negatives for a question would include code
snippets); with one dataset, a short last batch leaves one rank with a step
the others never take, and the run hangs in its gather.

Here the sampler (sentence-transformers' own, with its ``batch_sampler`` and
``multi_dataset_batch_sampler`` semantics) draws batches of the *global*
size, the same on every rank (same seed, same epoch), and :class:`RankShare`
gives each rank a contiguous share of each one. Resuming needs nothing more:
the Trainer skips the batches already trained, and the order is a function
of the seed and the epoch alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader

from ..data.files import rank_slice


class AtLeastRows:
    """One dataset's batch sampler without the batches that have fewer rows than there are ranks.

    A dataset's last batch (``dataloader_drop_last=False``) can be shorter than
    the number of ranks; a share of zero rows cannot be embedded, so that batch
    is left out (its rows come back in the next epoch's order).
    """

    def __init__(self, batch_sampler: BatchSampler, rows: int, ranks: int) -> None:
        self.batch_sampler, self.rows, self.ranks = batch_sampler, rows, ranks
        # read by the multi-dataset samplers
        self.batch_size, self.drop_last = getattr(batch_sampler, "batch_size", None), getattr(batch_sampler, "drop_last", True)

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for batch in self.batch_sampler if len(batch) >= self.ranks)

    def __len__(self) -> int:
        size = self.batch_size
        short = not self.drop_last and size is not None and 0 < self.rows % size < self.ranks
        return len(self.batch_sampler) - int(short)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)


class RankShare:
    """This rank's contiguous share of each global batch, as ``launch/train.py`` cuts it (:func:`rank_slice`).

    ``generator`` (the samplers' shared one) is seeded with ``seed + epoch``
    when an epoch starts, so an epoch's order depends on nothing else (not on
    the epochs drawn before it in this process): a run resumed in any epoch
    replays the same batches. ``batch_sampler`` is named as the Trainer looks
    for it (``set_epoch`` reaches it, also behind a resume's skip).
    """

    def __init__(self, batch_sampler: Any, rank: int, ranks: int, generator: torch.Generator, seed: int) -> None:
        self.batch_sampler, self.rank, self.ranks = batch_sampler, rank, ranks
        self.generator, self.seed, self.epoch = generator, seed, 0

    def __iter__(self) -> Iterator[list[int]]:
        self.generator.manual_seed(self.seed + self.epoch)
        for batch in self.batch_sampler:
            yield list(rank_slice(batch, self.rank, self.ranks))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)


class GlobalBatchLoader(DataLoader):
    """A DataLoader over :class:`RankShare` whose ``set_epoch`` (called by the Trainer each epoch) reaches it."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class WeightedBatchSampler(MultiDatasetDefaultBatchSampler):
    """Each batch's dataset drawn by weight, as ``launch/train.py``'s mixture does; seeded by (seed, epoch).

    For ``multi_dataset_batch_sampler=functools.partial(WeightedBatchSampler,
    weights=[...])``. An epoch has as many batches as all datasets together; a
    dataset drawn more often than it has batches starts its order again.
    """

    def __init__(self, dataset: ConcatDataset, batch_samplers: list[BatchSampler], weights: Sequence[float],
                 generator: torch.Generator | None = None, seed: int = 0) -> None:
        super().__init__(dataset, batch_samplers, generator, seed)
        if len(weights) != len(batch_samplers) or not all(w > 0 for w in weights):
            raise ValueError(f"one weight > 0 per dataset: {len(batch_samplers)} datasets, weights {list(weights)}")
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)

    def __iter__(self) -> Iterator[list[int]]:
        draws = torch.Generator().manual_seed((self.seed or 0) + self.epoch)
        offsets = [0, *torch.tensor([len(d) for d in self.dataset.datasets]).cumsum(0).tolist()]
        iterators = [iter(s) for s in self.batch_samplers]
        if len(self) == 0:
            return
        for d in torch.multinomial(self.weights, len(self), replacement=True, generator=draws).tolist():
            batch = next(iterators[d], None)
            if batch is None:  # this dataset's order is used up: start it again
                iterators[d] = iter(self.batch_samplers[d])
                batch = next(iterators[d], None)
            if batch is not None:
                yield [i + offsets[d] for i in batch]

    def __len__(self) -> int:
        return sum(len(s) for s in self.batch_samplers)
