"""``hf:NAME_OR_PATH``: any Hugging Face image-classification dataset.

* a hub name (``hf:cifar10``, ``hf:user/name``): ``datasets.load_dataset(NAME)`` (online);
* a folder written by ``save_to_disk`` (a ``DatasetDict``): ``datasets.load_from_disk``;
* a folder of parquet files, or a glob of them (``hf:/data/x/*.parquet``): the split of each file
  is read from its name (``train-00000-of-00004.parquet``, ``data/test-*.parquet``, ``val/``).

Splits: ``train`` and the first of ``test`` / ``validation`` / ``valid`` / ``val`` that has
labels (a hidden test split of -1 labels is passed over), or ``hf_split="TRAIN,TEST"``.
Columns: the one ``Image`` feature and the ``ClassLabel`` (else ``label`` / ``labels``) column,
or ``image_column`` / ``label_column``. Normalization: ``mean`` / ``std`` when given, else
measured on ``stats_samples`` seeded training images; the image size is the images' own when
they all share one square size, else 224 px (``--img-size`` overrides). Grey images stay one
channel. Only ``cache_dir`` (default: ``HF_DATASETS_CACHE``, under
``~/.cache/huggingface``) is written to, never the dataset's folder. Datasets whose labels are
grouped by class draw stratified subsets; shuffled ones take the first N.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from .core import DATASETS, DataError, Loaded, Stats
from .folder import image_transforms
from .images import BAD_IMAGE_ERRORS, HFImages, new_counter
from .sampling import SUBSET_SEED, grouped_by_class

TEST_SPLITS = ("test", "validation", "valid", "val")
LABEL_NAMES = ("label", "labels")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _fail(spec: str, what: str) -> DataError:
    return DataError(f"hf:{spec}: {what}")


def parquet_splits(files: Sequence[str], root: Path) -> dict:
    """``{split: [files]}`` from the names below ``root`` (the hub's layout: ``train-0000.parquet``,
    ``data/test-*.parquet``, ``val/part.parquet``); a file that names no split is training data."""
    out: dict = {}
    for f in sorted(files):
        words = re.split(r"[^a-z]+", os.path.relpath(f, root).lower())
        split = next((w for w in reversed(words) if w in ("train",) + TEST_SPLITS), "train")
        out.setdefault(split, []).append(str(f))
    return out


def open_splits(spec: str, cache_dir: Optional[str]):
    """A ``{split: Dataset}`` mapping for a hub name, a ``save_to_disk`` folder or parquet files."""
    import datasets as hfds
    hfds.disable_progress_bars()
    path = Path(spec).expanduser()
    files, root = None, path
    if any(c in spec for c in "*?["):
        files = glob.glob(str(path), recursive=True)
        root = Path(os.path.dirname(re.split(r"[*?\[]", str(path))[0]))
        if not files:
            raise _fail(spec, "no file matches this pattern")
    elif path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            ds = hfds.load_from_disk(str(path))
        except Exception as err:
            raise _fail(spec, f"cannot read the save_to_disk folder: {_line(err)}") from None
        if isinstance(ds, hfds.Dataset):
            raise _fail(spec, "holds a single split; save a DatasetDict with a train and a test split")
        return dict(ds)
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise _fail(spec, "a folder with neither a save_to_disk dataset nor parquet files")
    elif path.is_file():
        files, root = [str(path)], path.parent
    if files is not None:
        return dict(_load(spec, "parquet", cache_dir, data_files=parquet_splits(files, root)))
    return dict(_load(spec, spec, cache_dir))


def _load(spec: str, what: str, cache_dir: Optional[str], **kw):
    import datasets as hfds
    try:
        return hfds.load_dataset(what, cache_dir=cache_dir, **kw)
    except Exception as err:  # offline, unknown name, bad files: one line naming the dataset
        raise _fail(spec, f"cannot load ({type(err).__name__}: {_line(err)})") from None


def _floats(flag: str, value) -> Optional[Tuple[float, ...]]:
    """``"0.5,0.4,0.4"`` or a sequence -> a tuple of floats (None stays None)."""
    if value is None:
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        return tuple(float(v) for v in items)
    except ValueError:
        raise ValueError(f"{flag} takes numbers like 0.5,0.5,0.5, got {value!r}") from None


def _line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def pick_splits(spec: str, splits: dict, hf_split: Optional[str], labelled: Callable) -> Tuple[str, str]:
    """``(train, test)`` split names: ``hf_split`` as given, else ``train`` and the first of
    ``TEST_SPLITS`` whose labels ``labelled(name)`` says are real (ImageNet's hub ``test`` split
    holds -1 only, so its ``validation`` is taken)."""
    if hf_split:
        names = [s.strip() for s in hf_split.split(",")]
        if len(names) != 2 or not all(names):
            raise ValueError(f"--hf-split takes TRAIN,TEST split names, got {hf_split!r}")
    else:
        tests = [s for s in TEST_SPLITS if s in splits]
        names = ["train", next((s for s in tests if labelled(s)), tests[0] if tests else None)]
    missing = [n for n in names if n not in splits]
    if missing or names[1] is None:
        raise _fail(spec, f"no split {missing[0] if missing else 'test'!r}; it has {', '.join(splits)} "
                          f"(--hf-split TRAIN,TEST picks them)")
    return names[0], names[1]


def pick_columns(spec: str, ds, image_column: Optional[str], label_column: Optional[str]) -> Tuple[str, str]:
    import datasets as hfds
    feats = ds.features
    if image_column is None:
        images = [c for c, f in feats.items() if isinstance(f, hfds.Image)]
        if len(images) != 1:
            raise _fail(spec, f"{len(images)} image columns among {', '.join(feats)}; name one with --image-column")
        image_column = images[0]
    if label_column is None:
        labels = [c for c, f in feats.items() if isinstance(f, hfds.ClassLabel)] or \
                 [c for c in LABEL_NAMES if c in feats]
        if len(labels) != 1:
            raise _fail(spec, f"cannot tell the label column among {', '.join(feats)}; name it with --label-column")
        label_column = labels[0]
    for flag, col in (("--image-column", image_column), ("--label-column", label_column)):
        if col not in feats:
            raise _fail(spec, f"{flag} {col!r} is not a column; the columns are {', '.join(feats)}")
    return image_column, label_column


def _labelled(ds, column: str) -> bool:
    """False for a split without real labels (a hidden test set stores -1)."""
    return column in ds.column_names and len(ds) > 0 and max(ds[column]) >= 0


def _class_names(train: HFImages) -> Optional[Tuple[str, ...]]:
    """The ``ClassLabel``'s names of the label column, None for plain integer labels."""
    import datasets as hfds
    feature = train.ds.features[train.label_column]
    return tuple(feature.names) if isinstance(feature, hfds.ClassLabel) else None


def _num_classes(spec: str, train: HFImages, test: HFImages) -> int:
    import datasets as hfds
    feature = train.ds.features[train.label_column]
    if isinstance(feature, hfds.ClassLabel):
        return feature.num_classes
    labels = np.concatenate([train.labels, test.labels])
    if len(labels) == 0 or labels.min() < 0:
        raise _fail(spec, f"labels must be integers >= 0 in column {train.label_column!r}")
    return int(labels.max()) + 1


def _sample(ds: HFImages, n: int) -> np.ndarray:
    n = min(n, len(ds))
    return np.sort(np.random.default_rng(SUBSET_SEED).choice(len(ds), n, replace=False))


def inspect_images(ds: HFImages, n: int = 16) -> Tuple[Optional[int], str]:
    """``(common square size or None, "L" or "RGB")`` of ``n`` seeded images."""
    sizes, modes = set(), set()
    for i in _sample(ds, n):
        try:
            with ds._open(int(i)) as image:
                sizes.add(image.size)
                modes.add(image.mode)
        except BAD_IMAGE_ERRORS:  # a bad image is met (and counted) at training time
            continue
    size = next(iter(sizes)) if len(sizes) == 1 else None
    return (size[0] if size and size[0] == size[1] else None), ("L" if modes and modes <= GREY_MODES else "RGB")


def measure_stats(ds: HFImages, n: int, transform) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std over every pixel of ``n`` seeded images read through ``transform``."""
    view = ds._take(_sample(ds, n), transform=transform, bad=new_counter())  # the split's count stays as is
    total = sq = 0.0
    pixels = 0
    for i in range(len(view)):
        x = view[i][0].double().flatten(1)
        total, sq, pixels = total + x.sum(1), sq + (x * x).sum(1), pixels + x.shape[1]
    mean = total / pixels
    std = (sq / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@DATASETS.register("hf:")
def hf(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None, hf_split: Optional[str] = None,
       image_column: Optional[str] = None, label_column: Optional[str] = None, cache_dir: Optional[str] = None,
       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
       stats_samples: int = 1000) -> Loaded:
    """A Hugging Face dataset by hub name or local path (see the module's docstring)."""
    spec = name.partition(":")[2]
    if not spec:
        raise ValueError("--dataset hf: needs a hub name or a local path, e.g. hf:cifar10 or hf:/data/my_set")
    if data_dir:
        raise ValueError(f"--dataset hf:{spec} takes its path in the name; drop --data-dir {data_dir}")
    mean, std = _floats("--mean", mean), _floats("--std", std)
    if (mean is None) != (std is None) or stats_samples < 1:
        raise ValueError("give --mean and --std together (or neither), and --stats-samples >= 1")
    splits = open_splits(spec, cache_dir)
    train_name = hf_split.split(",")[0].strip() if hf_split else "train"
    if train_name not in splits:
        raise _fail(spec, f"no split {train_name!r}; it has {', '.join(splits)} (--hf-split TRAIN,TEST picks them)")
    image_column, label_column = pick_columns(spec, splits[train_name], image_column, label_column)
    train_name, test_name = pick_splits(spec, splits, hf_split, lambda s: _labelled(splits[s], label_column))
    kw = dict(image_column=image_column, label_column=label_column)
    probe = HFImages(splits[train_name], None, source=f"hf:{spec} {train_name}", **kw)
    native, mode = inspect_images(probe)
    size = img_size or native or 224
    train_tf, test_tf = image_transforms(size, native)
    train = HFImages(splits[train_name], train_tf, source=f"hf:{spec} {train_name}", mode=mode, labels=probe.labels,
                     by_class=grouped_by_class(probe.labels), eval_transform=test_tf, **kw)
    test = HFImages(splits[test_name], test_tf, source=f"hf:{spec} {test_name}", mode=mode, **kw)
    test.by_class = grouped_by_class(test.labels)
    if mean is None:
        mean, std = measure_stats(train, stats_samples, test_tf)
    chans = 1 if mode == "L" else 3
    if len(mean) != chans or len(std) != chans:
        raise ValueError(f"--mean and --std need {chans} value(s) each for hf:{spec}, got {len(mean)} and {len(std)}")
    return Loaded(train, test, Stats(_num_classes(spec, train, test), chans, size, tuple(mean), tuple(std),
                                     _class_names(train)))


hf.internal_settings = ("name", "data_dir", "img_size")
