"""What every dataset shares: the registry, the loaded result, class subsets and errors."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, List, NamedTuple, Optional, Tuple

from torch.utils.data import Dataset

from ..registry import Registry


class DataError(ValueError):
    """A dataset is missing, malformed or truncated; the message names the path."""


class Stats(NamedTuple):
    """Shape, normalization and class names of a dataset, declared next to its loader."""
    num_classes: int
    in_chans: int
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    class_names: Optional[Tuple[str, ...]] = None  # label i is class_names[i]; None: the ids "0".."k-1"


class Streamed(Dataset):
    """A training split read as a stream rather than sample by sample (:mod:`.shards`): it makes
    its own training loader, which keeps the trainer's loader protocol (``len``, a ``sampler`` with
    ``set_epoch(epoch, skip)``, ``batch_size``, ``generator``)."""

    def train_loader(self, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int = 0):
        raise NotImplementedError


class Loaded(NamedTuple):
    """What a registered loader returns."""
    train: Dataset
    test: Dataset
    stats: Stats


class DatasetRegistry(Registry):
    """A :class:`Registry` of dataset loaders that also resolves families by prefix (``hf:NAME``
    finds the loader registered as ``hf:``) and iterates over its names, so ``name in DATASETS``
    and ``", ".join(DATASETS)`` read as they would on a tuple of names."""

    FAMILY = "NAME_OR_PATH"  # how a prefix family is spelled in help texts

    def key(self, name: str) -> str:
        """The registered key for ``name``: itself, or its family prefix (``hf:cifar10`` -> ``hf:``)."""
        prefix, colon, _ = str(name).partition(":")
        return prefix + colon if colon and prefix + colon in self._entries else name

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and self.key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str):
        return super().get(self.key(name))

    def names(self) -> List[str]:
        return sorted(n + self.FAMILY if n.endswith(":") else n for n in self._entries)


DATASETS = DatasetRegistry("dataset")


def dataset_names() -> List[str]:
    """Every dataset a user may name (``hf:NAME_OR_PATH`` stands for the Hugging Face family)."""
    return DATASETS.names()


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train: Dataset = field(repr=False)
    test: Dataset = field(repr=False)
    classes: Optional[Tuple[int, ...]] = None  # original class ids kept (--classes), label i = classes[i]
    settings: dict = field(default_factory=dict)  # the dataset's own settings as given (e.g. image_column)
    class_names: Optional[Tuple[str, ...]] = None  # the name of label i (after --classes), where the data names them
    resized_from: Optional[Tuple[int, int]] = None  # (channels, size) of the files, resized for a model

    def meta(self) -> dict:
        """What a checkpoint records so a model can be rebuilt without retyping settings."""
        meta = {"dataset": self.name, "num_classes": self.num_classes, "in_chans": self.in_chans,
                "img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "classes": None if self.classes is None else list(self.classes)}
        if self.settings:
            meta["dataset_settings"] = dict(self.settings)
        if self.class_names is not None:
            meta["class_names"] = list(self.class_names)
        if self.resized_from is not None:
            meta["resized_from"] = list(self.resized_from)
        return meta


def parse_classes(spec) -> Optional[Tuple[int, ...]]:
    """``"0-4"`` / ``"5,6,7"`` / ``"0-2,7"`` (or a sequence of ints) -> a tuple of class ids in that
    order; None stays None. Empty lists, malformed items, negative ids and duplicates raise ValueError."""
    if spec is None:
        return None
    ids = _parse_ids(spec) if isinstance(spec, str) else [int(c) for c in spec]
    if not ids:
        raise ValueError(f"--classes: no class ids in {spec!r}")
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise ValueError(f"--classes: class id(s) {dup} listed more than once in {spec!r}")
    if min(ids) < 0:
        raise ValueError(f"--classes: class ids are >= 0, got {min(ids)} in {spec!r}")
    return tuple(ids)


def _parse_ids(spec: str) -> List[int]:
    ids = []
    for item in spec.split(","):
        item = item.strip()
        lo, dash, hi = item.partition("-")
        try:
            if dash:
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                ids.extend(range(a, b + 1))
            else:
                ids.append(int(item))
        except ValueError:
            raise ValueError(f"--classes: {item!r} in {spec!r} is not a class id or an ascending range "
                             f"like 0-4") from None
    return ids


def select_classes(info: DatasetInfo, classes) -> DatasetInfo:
    """``info`` with only ``classes`` (original ids, see :func:`parse_classes`) in the training and
    test sets, labels remapped to ``0..k-1`` in the listed order and ``num_classes = k``."""
    ids = parse_classes(classes)
    if ids is None:
        return info
    if info.classes is not None:
        raise ValueError(f"{info.name} already holds a class subset {list(info.classes)}")
    bad = [c for c in ids if c >= info.num_classes]
    if bad:
        raise ValueError(f"--classes: {info.name} has classes 0-{info.num_classes - 1}; no class {bad[0]}")
    names = None if info.class_names is None else tuple(info.class_names[c] for c in ids)
    return replace(info, train=info.train.select_classes(ids), test=info.test.select_classes(ids),
                   num_classes=len(ids), classes=ids, class_names=names)
