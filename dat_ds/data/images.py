"""Datasets of encoded images decoded one sample at a time (folders, Hugging Face datasets).

A :class:`~.decode.DecodingTransform` (the ``imagefolder`` crops) gets a sample's encoded bytes
and decodes them itself, at the scale its crop needs; any other transform gets the image as
Pillow decodes it.

**Bad samples: skip and count.** An image that cannot be decoded (truncated, garbage, an
unknown format) is found when a loader first reads it, mid-epoch. The dataset names it on
stderr (``skipping unreadable image PATH: reason``, once per process), returns the next
readable sample in its place so every rank's batches keep their shape, and counts it in a
shared-memory counter that data-loader workers update too: the count is the number of samples
asked for that were replaced, so each bad file counts once per epoch that reads it. :func:`bad_samples` reads the count;
the trainer sums it over ranks at each epoch's end. A run of ``MAX_BAD_IN_A_ROW`` unreadable
samples stops with a :class:`DataError` naming the first.

Subsets follow :mod:`.sampling`: stratified when ``by_class`` (files ordered by class), else
first-N.
"""
from __future__ import annotations

import io
import sys
import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .core import DataError
from .decode import DecodingTransform
from .sampling import stratified_indices

BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error)  # what PIL raises on bad bytes
MAX_BAD_IN_A_ROW = 64
_SLOTS = 257  # counter slot 0: the main process; 1 + worker id: each loader worker (no shared writes)
_reported: set = set()  # paths this process has already named on stderr


def new_counter() -> torch.Tensor:
    return torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()


def bad_samples(*datasets) -> int:
    """Unreadable samples this process (and its loader workers) met so far in ``datasets``, each
    shared counter counted once (a split's views, e.g. training set and hold-out, share one);
    0 for datasets that cannot hold bad samples.

    >>> seen = bad_samples(train_loader.dataset, test_loader.dataset)  # doctest: +SKIP
    """
    counters = {id(c): c for c in (getattr(ds, "bad", None) for ds in datasets) if isinstance(c, torch.Tensor)}
    return int(sum(int(c.sum()) for c in counters.values()))


class ImageSamples(Dataset):
    """Base of the decoded-image datasets: labels in memory, images read by :meth:`_open`.

    ``label_map`` (original label -> label), set by :meth:`select_classes`, relabels samples;
    ``eval_transform`` serves the held-out part of :meth:`split_off`. Samples are floats in
    [0, 1], or uint8 in a :meth:`raw_view` (what the loaders use).
    """

    def __init__(self, labels, transform: Callable, label_map: Optional[dict] = None, *, by_class: bool = False,
                 mode: str = "RGB", eval_transform: Optional[Callable] = None, bad: Optional[torch.Tensor] = None,
                 raw: bool = False):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.raw = raw  # uint8 samples (for loaders that convert on the device) instead of floats in [0, 1]
        self.transform, self.label_map, self.by_class, self.mode = transform, label_map, by_class, mode
        self.eval_transform = eval_transform
        self.bad = new_counter() if bad is None else bad

    # what a subclass provides
    def _open(self, i: int):
        """An open PIL image for sample ``i``."""
        raise NotImplementedError

    def _encoded(self, i: int) -> bytes:
        """The encoded file of sample ``i`` (for a :class:`~.decode.DecodingTransform`)."""
        raise NotImplementedError(f"{type(self).__name__} does not hand out encoded files")

    def where(self, i: int) -> str:
        """The file (or row) of sample ``i``, for messages."""
        raise NotImplementedError

    def _take(self, idx: np.ndarray, **changes) -> "ImageSamples":
        """The samples ``idx`` (positions in this view) as a new view; ``changes`` override settings."""
        raise NotImplementedError

    def _settings(self, **changes) -> dict:
        out = dict(label_map=self.label_map, by_class=self.by_class, mode=self.mode,
                   eval_transform=self.eval_transform, bad=self.bad, transform=self.transform, raw=self.raw)
        out.update(changes)
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        first = int(i)
        for k in range(MAX_BAD_IN_A_ROW):
            j = (first + k) % len(self)
            try:
                x = self._read(j)
                if not self.raw and x.dtype == torch.uint8:
                    x = x.float().div_(255)
            except BAD_IMAGE_ERRORS as err:
                self._report_bad(j, err, count=k == 0)  # a bad replacement counts when it is asked for itself
                continue
            label = int(self.labels[j])
            return x, self.label_map[label] if self.label_map else label
        raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row from {self.where(first)}")

    def _read(self, i: int):
        """Sample ``i`` through the transform: a :class:`~.decode.DecodingTransform` gets the
        encoded bytes (it decodes at the scale its crop needs), any other transform the decoded image."""
        if isinstance(self.transform, DecodingTransform):
            return self.transform(self._encoded(i), self.mode)
        with self._open(i) as image:
            return self.transform(image.convert(self.mode))

    def _report_bad(self, i: int, err: BaseException, count: bool) -> None:
        if count:
            info = get_worker_info()
            self.bad[0 if info is None else 1 + info.id % (_SLOTS - 1)] += 1
        where = self.where(i)
        if where not in _reported:
            _reported.add(where)
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            print(f"dat-ds: skipping unreadable image {where}: {reason} (counted in bad_samples)",
                  file=sys.stderr, flush=True)

    def raw_view(self) -> "ImageSamples":
        """The same samples as uint8 tensors: loaders move those to the device and convert there."""
        return self._take(np.arange(len(self)), raw=True)

    def subset(self, limit: Optional[int]) -> "ImageSamples":
        """``limit`` samples: a class-stratified seeded draw when ``by_class``, else the first."""
        if limit is None or limit >= len(self):
            return self
        return self._take(stratified_indices(self.labels, limit) if self.by_class else np.arange(limit))

    def select_classes(self, classes: Sequence[int]) -> "ImageSamples":
        """Only the samples of ``classes`` (original ids), relabelled ``0..k-1`` in that order (index
        selection on the labels: no image is decoded)."""
        idx = np.flatnonzero(np.isin(self.labels, np.asarray(list(classes))))
        return self._take(idx, label_map={c: i for i, c in enumerate(classes)})

    def split_off(self, n: int):
        """``(the rest, n held-out samples)``: stratified when ``by_class``, else the last n; the
        held-out part uses ``eval_transform``. ``(self, None)`` for n = 0."""
        if n <= 0:
            return self, None
        if n >= len(self):
            raise ValueError(f"--holdout {n} leaves no training samples out of {len(self)}")
        held = stratified_indices(self.labels, n) if self.by_class else np.arange(len(self) - n, len(self))
        rest = np.setdiff1d(np.arange(len(self)), held)
        return self._take(rest), self._take(held, transform=self.eval_transform or self.transform)


class FolderImages(ImageSamples):
    """Image files with labels, e.g. an ImageFolder's index (see :func:`.folder.index_folder`)."""

    def __init__(self, paths, labels, transform: Callable, label_map: Optional[dict] = None, **kw):
        super().__init__(labels, transform, label_map, **kw)
        self.paths = np.asarray(paths)  # one numpy array, not a list of str: workers share its pages
        assert len(self.paths) == len(self.labels)

    def _open(self, i: int):
        from PIL import Image
        return Image.open(str(self.paths[i]))

    def _encoded(self, i: int) -> bytes:
        with open(str(self.paths[i]), "rb") as f:
            return f.read()

    def where(self, i: int) -> str:
        return str(self.paths[i])

    def _take(self, idx, **changes) -> "FolderImages":
        s = self._settings(**changes)
        return FolderImages(self.paths[idx], self.labels[idx], s.pop("transform"), s.pop("label_map"), **s)


class HFImages(ImageSamples):
    """A Hugging Face ``datasets`` image split as (tensor in [0, 1], label) samples.

    The image column is read undecoded and decoded here, so a bad image is named (by its path, or
    ``source`` and row) and skipped like a bad file.
    """

    def __init__(self, ds, transform: Callable, label_map: Optional[dict] = None, *, image_column: str = "image",
                 label_column: str = "label", source: str = "dataset", rows=None, labels=None, **kw):
        ds = _undecoded(ds, image_column)
        super().__init__(np.asarray(ds[label_column]) if labels is None else labels, transform, label_map, **kw)
        self.ds, self.image_column, self.label_column, self.source = ds, image_column, label_column, source
        self.rows = np.arange(len(ds)) if rows is None else np.asarray(rows)  # rows of the original split

    def _open(self, i: int):
        from PIL import Image
        cell = self.ds[int(i)][self.image_column]
        if cell.get("bytes") is not None:
            return Image.open(io.BytesIO(cell["bytes"]))
        return Image.open(cell["path"])

    def _encoded(self, i: int) -> bytes:
        cell = self.ds[int(i)][self.image_column]
        if cell.get("bytes") is not None:
            return cell["bytes"]
        with open(cell["path"], "rb") as f:
            return f.read()

    def where(self, i: int) -> str:
        path = self.ds[int(i)][self.image_column].get("path")
        return f"{self.source} row {int(self.rows[i])}" + (f" ({path})" if path else "")

    def _take(self, idx, **changes) -> "HFImages":
        s = self._settings(**changes)
        idx = np.asarray(idx, dtype=np.int64)
        return HFImages(self.ds.select(idx), s.pop("transform"), s.pop("label_map"), image_column=self.image_column,
                        label_column=self.label_column, source=self.source, rows=self.rows[idx],
                        labels=self.labels[idx], **s)


def _undecoded(ds, column: str):
    """``ds`` with ``column`` read as ``{"bytes", "path"}`` instead of a decoded PIL image."""
    import datasets as hfds
    feature = ds.features.get(column)
    if feature is None:
        raise DataError(f"no image column {column!r}; the columns are {', '.join(ds.column_names)}")
    if isinstance(feature, hfds.Image) and feature.decode:
        return ds.cast_column(column, hfds.Image(decode=False))
    return ds
