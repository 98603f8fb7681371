"""Small datasets held in memory as uint8 tensors, sliced a batch at a time."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset


class TensorImages(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels; batches come out as float in [0, 1].

    ``augment`` is applied to whole uint8 batches (see :func:`random_crop_flip`). Subsets take the
    first N and the hold-out the last N: every in-memory dataset here is in shuffled order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: Optional[Callable] = None,
                 raw: bool = False):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels, self.augment = images, labels.long(), augment
        self.raw = raw  # uint8 batches (for loaders that convert on the device) instead of floats in [0, 1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, idx: Sequence[int]):
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.images[idx]
        if self.augment is not None:
            x = self.augment(x)
        return (x if self.raw else x.float().div_(255)), self.labels[idx]

    def raw_view(self) -> "TensorImages":
        """The same samples as uint8 batches: loaders move those to the device and convert there."""
        return TensorImages(self.images, self.labels, self.augment, raw=True)

    def subset(self, limit: Optional[int]) -> "TensorImages":
        if limit is None or limit >= len(self):
            return self
        return TensorImages(self.images[:limit], self.labels[:limit], self.augment)

    def select_classes(self, classes: Sequence[int]) -> "TensorImages":
        """Only the samples of ``classes`` (original ids), relabelled ``0..k-1`` in that order."""
        ids = torch.as_tensor(list(classes), dtype=torch.long)
        keep = torch.isin(self.labels, ids)
        lut = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)  # original id -> new label
        lut[ids] = torch.arange(len(ids))
        return TensorImages(self.images[keep], lut[self.labels[keep]], self.augment)

    def split_off(self, n: int):
        """``(all but the last n, the last n without augmentation)``; ``(self, None)`` for n = 0."""
        if n <= 0:
            return self, None
        if n >= len(self):
            raise ValueError(f"--holdout {n} leaves no training samples out of {len(self)}")
        return (TensorImages(self.images[:-n], self.labels[:-n], self.augment),
                TensorImages(self.images[-n:], self.labels[-n:]))


def random_crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel crop and horizontal flip of a uint8 batch, vectorized."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1, 1))
    ox = torch.randint(0, 2 * pad + 1, (b, 1, 1))
    flip = torch.rand(b, 1, 1) < 0.5
    cols = torch.arange(w).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + ox
    rows = torch.arange(h).view(1, h, 1) + oy
    out = padded[torch.arange(b).view(b, 1, 1), :, rows, cols]  # (b, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
