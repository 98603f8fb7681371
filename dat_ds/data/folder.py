"""``imagefolder``: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (the ImageNet layout).

The folders are indexed with torchvision's ``ImageFolder`` scan (class folders in sorted order,
files by extension): ``bench/loader_bench.py`` measured it against Hugging Face's
``imagefolder`` builder (see ``bench/REPORT.md``). Nothing is written anywhere: the index lives
in memory, so a read-only ``--data-dir`` works. Files are ordered by class, so
``--train-limit`` / ``--eval-limit`` / ``--holdout`` draw class-stratified subsets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .core import DATASETS, DataError, Loaded, Stats
from .decode import RandomResizedCropFlip, ResizeCenterCrop
from .images import FolderImages

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_DECODER = "simplejpeg"  # the fastest per worker in bench/loader_bench.py (bench/REPORT.md)


def index_folder(root: Path, class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[np.ndarray, np.ndarray, list]:
    """``(paths, labels, class names)`` of an ImageFolder; ``class_to_idx`` (the training split's)
    labels a validation split with the same ids."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    try:
        names, found = find_classes(str(root))
    except FileNotFoundError as err:
        raise DataError(f"imagefolder: {err}") from None
    if class_to_idx is not None:
        extra = sorted(set(names) - set(class_to_idx))
        if extra:
            raise DataError(f"imagefolder: {root} has class folder {extra[0]!r} that the training split lacks")
        found = {n: class_to_idx[n] for n in names}
        names = list(class_to_idx)
    try:
        samples = make_dataset(str(root), found, extensions=IMG_EXTENSIONS, allow_empty=class_to_idx is not None)
    except FileNotFoundError as err:
        raise DataError(f"imagefolder: {root}: {err}") from None
    paths = np.array([p for p, _ in samples])
    labels = np.array([c for _, c in samples], dtype=np.int64)
    return paths, labels, names


def image_transforms(img_size: int, native: Optional[int] = None):
    """``(train, test)`` transforms: ImageNet's RandomResizedCrop + flip and resize + center crop;
    for small images already at ``img_size`` (``native``), CIFAR's padded crop + flip and no resize.
    Both end in uint8 tensors (a quarter of float32's bytes on the way to the device); the
    dataset turns them into floats in [0, 1] unless its loader asks for raw batches."""
    from torchvision import transforms as T
    if native == img_size and img_size <= 64:
        return (T.Compose([T.RandomCrop(img_size, padding=img_size // 8), T.RandomHorizontalFlip(), T.PILToTensor()]),
                T.PILToTensor())
    return (T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.PILToTensor()]),
            T.Compose([T.Resize(int(img_size * 256 / 224)), T.CenterCrop(img_size), T.PILToTensor()]))


def decoding_transforms(img_size: int, decoder: str) -> Tuple[RandomResizedCropFlip, ResizeCenterCrop]:
    """:func:`image_transforms`'s ImageNet pair on encoded files: each picks its region from the
    header and ``decoder`` decodes at the scale the region needs (see :mod:`.decode`)."""
    return (RandomResizedCropFlip(img_size, decoder),
            ResizeCenterCrop(img_size, decoder, resize=int(img_size * 256 / 224)))


def load_imagefolder(data_dir: Optional[str], img_size: int = 224,
                     decoder: str = DEFAULT_DECODER) -> Tuple[FolderImages, FolderImages, list]:
    """``(train, test, class names)``: label i is the i-th class folder in sorted order."""
    if not data_dir or not Path(data_dir).is_dir():
        raise DataError(f"imagefolder needs --data-dir with train/ and val/ class folders, got {data_dir}")
    root = Path(data_dir)
    splits = {"train": root / "train", "test": root / "val" if (root / "val").is_dir() else root / "test"}
    for path in splits.values():
        if not path.is_dir():
            raise DataError(f"imagefolder: missing {path} (expected train/ and val/ class folders)")
    train_paths, train_labels, names = index_folder(splits["train"])
    test_paths, test_labels, _ = index_folder(splits["test"], {n: i for i, n in enumerate(names)})
    train_tf, test_tf = decoding_transforms(img_size, decoder)
    train = FolderImages(train_paths, train_labels, train_tf, by_class=True, eval_transform=test_tf)
    test = FolderImages(test_paths, test_labels, test_tf, by_class=True)
    return train, test, list(names)


@DATASETS.register("imagefolder")
def imagefolder(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None,
                decoder: str = DEFAULT_DECODER) -> Loaded:
    """An ImageNet-layout folder of any size; RGB, ImageNet normalization, 224 px unless --img-size.

    Settings:
        decoder: how JPEGs are decoded: simplejpeg (libjpeg-turbo, at the DCT scale the crop needs;
            the default), pil-draft (Pillow's draft mode, the same scaling) or pil (Pillow, full size:
            torchvision's transforms byte for byte). The crops are the same; the pixels of a scaled
            decode differ slightly from a full one.
    """
    size = img_size or 224
    train, test, names = load_imagefolder(data_dir, size, decoder)
    return Loaded(train, test, Stats(len(names), 3, size, IMAGENET_MEAN, IMAGENET_STD, tuple(names)))


imagefolder.internal_settings = ("name", "data_dir", "img_size")
