"""Rank-sharded samplers and the training / evaluation data loaders."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .core import Streamed


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` reads indices ``r, r + n, ...``: disjoint, no padding, exact counts."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded order of an epoch that can begin part-way, on any number of ranks.

    The epoch's order is one permutation of the dataset, seeded by ``seed + epoch`` (as
    ``DistributedSampler``'s), dealt to the ranks in turn: rank ``r`` of ``W`` reads positions
    ``r, r + W, ...``, the ragged end dropped. After ``set_epoch(e, consumed=P)`` the first ``P``
    positions (what the ranks of a checkpoint trained, counted over all of them) are left out and
    the rest is dealt to this world's ranks, so a run resumed on another number of ranks goes on
    with exactly the samples not yet trained. On the same world, ``consumed = k * W`` is the
    rank's own order without its first ``k`` indices (``set_epoch(e, skip=k)``), bit for bit
    ``DistributedSampler(drop_last=True)``'s.
    """

    elastic = True  # set_epoch takes ``consumed``: resumable on another number of ranks

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        self.length, self.num_replicas, self.rank, self.shuffle, self.seed = len(dataset), num_replicas, rank, \
            shuffle, seed
        self.epoch = self.consumed = 0

    def set_epoch(self, epoch: int, skip: int = 0, consumed: Optional[int] = None) -> None:
        """Epoch ``epoch`` without its first ``consumed`` positions (default ``skip`` per rank)."""
        self.epoch = epoch
        self.consumed = skip * self.num_replicas if consumed is None else consumed

    def order(self) -> torch.Tensor:
        """The epoch's permutation of the dataset (the same on every rank and world size)."""
        if not self.shuffle:
            return torch.arange(self.length)
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __len__(self) -> int:
        return max(0, self.length - self.consumed) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        end = self.consumed + len(self) * self.num_replicas
        return iter(self.order()[self.consumed + self.rank:end:self.num_replicas].tolist())


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a training loader's generator for ``(run seed, epoch, rank)``: a
    ``SeedSequence`` hash, so no two triples share a seed by arithmetic accident."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0, consumed: Optional[int] = None) -> None:
    """Point a :func:`train_loader` at ``epoch``, ``skip_batches`` batches in (or, for a sampler
    that can resume on another world size, past the first ``consumed`` samples of the epoch's order).

    The loader draws its worker seeds from its own generator, reseeded here from the run's seed,
    the epoch and the rank (:func:`loader_seed`): worker k of every rank draws its own
    augmentations, starting an iterator never touches the global RNG (whose state a checkpoint
    restores), and a resumed epoch gives its workers the same seeds.
    """
    # batch_size None: the sampler yields whole batches (e.g. labeled + pseudo-labeled), so it skips batches
    if consumed is not None:
        loader.sampler.set_epoch(epoch, consumed=consumed)
    else:
        loader.sampler.set_epoch(epoch, skip_batches * (loader.batch_size or 1))
    loader.generator.manual_seed(loader_seed(loader.sampler.seed, epoch, loader.sampler.rank))


def _batch_collate(batch):
    """Batches from ``__getitems__`` are already tensors; per-sample lists get stacked."""
    if isinstance(batch, tuple):
        return batch
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.as_tensor(ys)


def read_batch(ds: Dataset, idx: Sequence[int]):
    """``(x, y)`` for the samples ``idx`` of any dataset: one ``__getitems__`` slice where it has
    one, else its samples stacked."""
    if hasattr(ds, "__getitems__"):
        return ds.__getitems__(idx)
    return _batch_collate([ds[i] for i in idx])


def raw_batches(ds: Dataset) -> Dataset:
    """``ds`` yielding uint8 images where it can (4x fewer bytes to the device); :func:`to_device`
    turns them into floats in [0, 1] there. Other datasets are returned as they are."""
    return ds.raw_view() if hasattr(ds, "raw_view") else ds


def to_device(x: torch.Tensor, y: torch.Tensor, device, memory_format=torch.preserve_format) -> tuple:
    """A batch on ``device``, images as floats in [0, 1]: uint8 batches are converted after the
    copy, on the device. From pinned memory the copies do not block the host. ``memory_format``:
    the images' layout there (channels-last for a model laid out so, :func:`dat_ds.speed.input_format`),
    taken in the same pass as the conversion to floats."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if x.dim() != 4:
        memory_format = torch.preserve_format
    if x.dtype == torch.uint8:
        x = x.to(torch.float32, memory_format=memory_format).div_(255)
    elif memory_format is not torch.preserve_format:
        x = x.contiguous(memory_format=memory_format)
    return x, y


def _pin() -> bool:
    """Pinned host memory makes ``non_blocking`` copies asynchronous; only CUDA has it."""
    return torch.cuda.is_available()


def train_loader(ds: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0) -> DataLoader:
    """Shuffled, rank-sharded batches of ``batch_size`` (the per-rank micro-batch); drops the ragged end.
    A :class:`~.core.Streamed` split makes its own loader."""
    if isinstance(ds, Streamed):
        return ds.train_loader(batch_size, rank, world_size, seed, num_workers)
    if len(ds) < batch_size * world_size:
        raise ValueError(f"the training set has {len(ds)} samples, fewer than one global batch "
                         f"({batch_size} x {world_size} ranks); raise --train-limit or lower the batch size")
    sampler = ResumableSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    # workers start afresh every epoch (not persistent): persistent ones keep the RNG of the epoch
    # they started in, so a run resumed at epoch e would not draw the augmentations it drew before
    return DataLoader(raw_batches(ds), batch_size=batch_size, sampler=sampler, drop_last=True,
                      collate_fn=_batch_collate, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), pin_memory=_pin())


def eval_loader(ds: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(raw_batches(ds), batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size),
                      collate_fn=_batch_collate, num_workers=num_workers, pin_memory=_pin())
