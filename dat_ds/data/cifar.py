"""``cifar10`` / ``cifar100``: the python-pickle batches (``cifar-10-batches-py``), read with an
unpickler that only builds lists, dicts, bytes and numpy arrays (nothing is executed). The
batches are in shuffled order: ``--eval-limit N`` takes the first N test points, as RobustBench
does."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .core import DATASETS, DataError, Loaded, Stats
from .tensors import TensorImages, random_crop_flip

CIFAR10 = Stats(num_classes=10, in_chans=3, img_size=32, mean=(0.4914, 0.4822, 0.4465),
                std=(0.2471, 0.2435, 0.2616))
CIFAR100 = Stats(num_classes=100, in_chans=3, img_size=32, mean=(0.5071, 0.4865, 0.4409),
                 std=(0.2673, 0.2564, 0.2762))


class _SafeUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batches hold: dicts, lists, bytes, str, numbers, numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_batch(path: Path, need_data: bool = True) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR batch {path}") from None
    except Exception as err:
        raise DataError(f"cannot read CIFAR batch {path}: {err}") from None
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if need_data and "data" not in d:
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


def label_names(name: str, data_dir: str, num_classes: int) -> Optional[Tuple[str, ...]]:
    """The class names the batches carry (``batches.meta``'s ``label_names``, ``meta``'s
    ``fine_label_names``); None when that file is absent or does not name every class."""
    root = Path(data_dir)
    sub, file, key = (("cifar-10-batches-py", "batches.meta", "label_names") if name == "cifar10"
                      else ("cifar-100-python", "meta", "fine_label_names"))
    path = root / sub / file if (root / sub).is_dir() else root / file
    if not path.is_file():
        return None
    names = _load_batch(path, need_data=False).get(key)
    if not isinstance(names, list) or len(names) != num_classes:
        return None
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


@DATASETS.register("cifar10")
def cifar10(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None) -> Loaded:
    """CIFAR-10 python batches, 50,000 + 10,000 32 px images."""
    train, test = load_cifar("cifar10", data_dir)
    return Loaded(train, test, CIFAR10._replace(class_names=label_names("cifar10", data_dir, 10)))


@DATASETS.register("cifar100")
def cifar100(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None) -> Loaded:
    """CIFAR-100 python batches (fine labels)."""
    train, test = load_cifar("cifar100", data_dir)
    return Loaded(train, test, CIFAR100._replace(class_names=label_names("cifar100", data_dir, 100)))


cifar10.internal_settings = cifar100.internal_settings = ("name", "data_dir", "img_size")
cifar10.resizes = cifar100.resizes = False  # one fixed image size: --img-size does not apply
