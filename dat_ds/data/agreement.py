"""What the folders of ``--data-placement local`` agree on before a model is built: the classes
(the model's head), the image shape and the normalization (:func:`agree`, a collective).

* an ImageFolder's labels are positions in its sorted class folders, so folders holding other
  classes (non-IID shards) train on the union of the folders' class names, relabelled;
* plain integer labels (IDX, CIFAR, integer columns) are the same ids everywhere: the largest
  class count is taken;
* a Hugging Face ``ClassLabel``'s names are ordered by the dataset: folders that name other
  classes are refused in one line naming two of them;
* image shapes must match; measured normalization statistics (``hf:`` without ``--mean``) are
  pooled as one measurement over every folder's training images.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np

from .. import dist
from .core import DataError, DatasetInfo
from .images import FolderImages, HFImages


@dataclass(frozen=True)
class FolderFacts:
    """What the model and the run need to agree on, as one folder has it."""
    folder: str
    num_classes: int
    names: Optional[Tuple[str, ...]]  # class names, where the dataset names its classes
    union: bool  # labels are positions in the sorted names (an ImageFolder): folders may hold other classes
    shape: Tuple[int, int]  # (channels, image size)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train: int

    @classmethod
    def of(cls, info: DatasetInfo, folder: str) -> "FolderFacts":
        names, union = class_names(info)
        return cls(folder, info.num_classes, names, union, (info.in_chans, info.img_size), tuple(info.mean),
                   tuple(info.std), len(info.train))


def class_names(info: DatasetInfo) -> Tuple[Optional[Tuple[str, ...]], bool]:
    """``(class names that labels index, whether they are the sorted names a folder holds)``;
    ``(None, False)`` where labels are ids shared by every folder (IDX, CIFAR, integer columns),
    whatever names the dataset gives them."""
    if isinstance(info.train, FolderImages):  # an ImageFolder: labels index its sorted class folders
        return tuple(info.class_names), True
    if isinstance(info.train, HFImages) and info.class_names is not None:  # a ClassLabel's names
        return tuple(info.class_names), False
    return None, False


def agreed_classes(facts: Sequence[FolderFacts]) -> Tuple[int, Optional[Tuple[str, ...]]]:
    """``(number of classes, the class names)`` every folder uses, or a one-line ``DataError``."""
    names = {f.names for f in facts}
    if names == {None}:  # plain ids: the same classes wherever they occur
        return max(f.num_classes for f in facts), None
    if len(names) == 1:
        return facts[0].num_classes, facts[0].names
    if all(f.union for f in facts):
        merged = tuple(sorted(set().union(*names)))
        return len(merged), merged
    a, b = next((a, b) for a in facts for b in facts if a.names != b.names)
    raise DataError(f"--data-placement local: the folders name other classes: {a.folder} has "
                    f"{', '.join(a.names or ['ids'])} and {b.folder} has {', '.join(b.names or ['ids'])} "
                    f"(labels are positions in these names; give every folder the same names)")


def agreed_stats(facts: Sequence[FolderFacts]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)``: the folders' own when they agree, else pooled (each folder's weighted by
    its training images, as one measurement over all of them)."""
    if len({(f.mean, f.std) for f in facts}) == 1:
        return facts[0].mean, facts[0].std
    w = np.array([f.train for f in facts], dtype=np.float64)[:, None]
    mean, std = np.array([f.mean for f in facts]), np.array([f.std for f in facts])
    pooled = (w * mean).sum(0) / w.sum()
    var = (w * (std ** 2 + mean ** 2)).sum(0) / w.sum() - pooled ** 2
    return (tuple(round(float(v), 4) for v in pooled),
            tuple(round(float(v), 4) for v in np.sqrt(np.maximum(var, 1e-12))))


def agree(info: DatasetInfo, folder: str) -> DatasetInfo:
    """``info`` (read from ``folder``) with the classes, shape and normalization every folder uses
    (collective); an ImageFolder's labels become positions in the union of the folders' class names."""
    mine = FolderFacts.of(info, folder)
    every = dist.all_gather_object(mine)
    shapes = {f.shape: f.folder for f in every}
    if len(shapes) > 1:
        (s1, f1), (s2, f2) = list(shapes.items())[:2]
        raise DataError(f"--data-placement local: the folders hold images of other shapes: {f1} "
                        f"{s1[0]}x{s1[1]}px and {f2} {s2[0]}x{s2[1]}px (give --img-size, or the same images)")
    num_classes, names = agreed_classes(every)
    mean, std = agreed_stats(every)
    if names is not None and mine.names != names:
        lut = np.array([names.index(n) for n in mine.names], dtype=np.int64)
        info = replace(info, train=_relabel(info.train, lut), test=_relabel(info.test, lut))
    return replace(info, num_classes=num_classes, mean=mean, std=std, class_names=names or info.class_names)


def _relabel(ds: FolderImages, lut: np.ndarray) -> FolderImages:
    return FolderImages(ds.paths, lut[ds.labels], **ds._settings())
