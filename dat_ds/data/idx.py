"""``fashion_mnist`` / ``mnist``: the IDX files (``*-images-idx3-ubyte[.gz]``), from Debian's
``dataset-fashion-mnist`` package, a torchvision download folder, or ``--data-dir``. The files
are in shuffled order: ``--train-limit`` / ``--eval-limit`` take the first N."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .core import DATASETS, DataError, Loaded, Stats
from .tensors import TensorImages

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")  # the dataset's own names for labels 0..9 (Xiao et al. 2017)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST = Stats(num_classes=10, in_chans=1, img_size=28, mean=(0.2860,), std=(0.3530,),
                      class_names=FASHION_MNIST_CLASSES)
MNIST = Stats(num_classes=10, in_chans=1, img_size=28, mean=(0.1307,), std=(0.3081,), class_names=DIGIT_CLASSES)


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


@DATASETS.register("fashion_mnist")
def fashion_mnist(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None) -> Loaded:
    """Fashion-MNIST, 60,000 + 10,000 28 px grey images."""
    return Loaded(*load_mnist_family("fashion_mnist", data_dir), FASHION_MNIST)


@DATASETS.register("mnist")
def mnist(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None) -> Loaded:
    """MNIST, 60,000 + 10,000 28 px digits."""
    return Loaded(*load_mnist_family("mnist", data_dir), MNIST)


fashion_mnist.internal_settings = mnist.internal_settings = ("name", "data_dir", "img_size")
fashion_mnist.resizes = mnist.resizes = False  # one fixed image size: --img-size does not apply
