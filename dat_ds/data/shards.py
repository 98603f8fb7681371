"""``shards``: image datasets larger than one disk, streamed from chunked shards (litdata).

**The format and why.** A split is a folder of litdata chunks (``chunk-*.bin`` plus its
``index.json``), written by ``recipes/make_shards.py`` from an image folder, an ``hf:`` dataset or
any registered dataset. litdata reads it from a local folder or a URL (``s3://``, ``gs://``,
``azure://``, ``hf://``: the library downloads chunks ahead into ``cache_dir``), every rank and
loader worker reading only the chunks it is dealt. The choice, among the streaming libraries on
the registry, was made on how each resumes an interrupted epoch:

* MosaicML ``streaming`` has the best semantics (one sample order whatever the number of ranks,
  "canonical nodes"; a loader state resumes mid-epoch on any world), but its newest release
  (0.13.0) requires ``numpy<2.2``, ``transformers<5`` and ``xxhash<4``: it cannot be installed
  beside this project's stack.
* Hugging Face ``IterableDataset.state_dict()`` resumes mid-epoch, but its shuffle buffer is not
  saved (the samples in it are lost on resume), and ``split_dataset_by_node`` can leave ranks with
  unequal counts, which stalls the ranks' collectives.
* ``webdataset`` splits by shard and has no mid-epoch resume.
* litdata (Lightning) shuffles chunks and the samples inside them, gives every rank the same
  number of samples (``drop_last``), and its loader state resumes an epoch mid-way exactly: the
  rest of the epoch is the samples the uninterrupted epoch would have read, none twice, none
  dropped, when the number of ranks, loader workers and the micro batch are the ones the epoch
  began with (``tests/test_shards.py`` records sample ids of real runs). litdata also offers an
  "elastic" resume on another topology, but it rounds the samples trained down to a multiple of
  the new global batch (some are trained twice) and, with loader workers, lost samples in our
  check; so an epoch interrupted inside goes on only on the topology it began on, and from an
  epoch's end a run goes on on any number of ranks.

**Layout** of ``--data-dir`` (a folder or a URL): ``dataset.json`` (classes, image size,
channels, normalization, sample counts, the test split's labels), ``train/`` and ``val/``. Each
record is ``{"image": the encoded file (JPEG, PNG, ... as the source stored it), "label": int,
"index": its position in the source split}``. The training split is written in a seeded random
order, since litdata shuffles chunks and windows inside them, not the whole split: class-ordered
chunks would give class-ordered batches.

**Training** streams the training split through :class:`ShardLoader` (the trainer's loader
protocol: ``len``, ``sampler.set_epoch(epoch, skip)``); its position goes into the rank's
checkpoint as a :class:`ShardState`. The test split is read by random access
(:class:`ShardImages`), so evaluation, ``--eval-limit`` and ``--classes`` work as for folders;
the training split is only streamed, so ``--train-limit``, ``--classes`` and ``--holdout`` are
given to the converter instead.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .core import DATASETS, DataError, Loaded, Stats, Streamed
from .folder import image_transforms
from .images import ImageSamples

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # litdata asks PyPI for news on every dataset made

FORMAT = "dat-ds shards 1"
META = "dataset.json"
URL_SCHEMES = ("s3://", "gs://", "azure://", "hf://", "http://", "https://")


def is_url(path: str) -> bool:
    return str(path).startswith(URL_SCHEMES)


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


# --- the dataset's description ---------------------------------------------------------------


@dataclass(frozen=True)
class ShardMeta:
    """``dataset.json``: what the converter learned of the source, so no rank reads the data to learn it."""
    source: str
    num_classes: int
    in_chans: int
    img_size: int
    native: Optional[int]  # the images' own square size (small images get the padded-crop augmentation)
    mode: str  # "RGB" or "L"
    mean: tuple
    std: tuple
    train_samples: int
    val_labels: tuple
    order_seed: int
    format: str = FORMAT
    class_names: Optional[tuple] = None  # the name of label i, where the source names its classes

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def read(cls, root: str, cache_dir: Optional[str] = None) -> "ShardMeta":
        text = _read_text(join(root, META), cache_dir)
        try:
            d = json.loads(text)
            names = d.get("class_names")
            meta = cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"]), "val_labels": tuple(d["val_labels"]),
                          "class_names": None if names is None else tuple(names)})
        except (ValueError, TypeError, KeyError) as err:
            raise DataError(f"shards: {join(root, META)} is not a dat-ds shard description ({err})") from None
        if meta.format != FORMAT:
            raise DataError(f"shards: {join(root, META)} is format {meta.format!r}; this dat-ds reads {FORMAT!r}")
        return meta


def _read_text(path: str, cache_dir: Optional[str]) -> str:
    """A small file from a folder or, through litdata's downloaders, a URL."""
    if not is_url(path):
        try:
            return Path(path).read_text()
        except OSError as err:
            raise DataError(f"shards: cannot read {path} ({err.strerror or err}); write the shards with "
                            f"recipes/make_shards.py") from None
    from litdata.streaming.downloader import get_downloader
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        try:
            get_downloader(path.rsplit("/", 1)[0], tmp, []).download_file(path, local)
            return Path(local).read_text()
        except Exception as err:  # offline, no such bucket, no credentials: one line naming the file
            raise DataError(f"shards: cannot read {path} ({type(err).__name__}: {err})") from None


# --- reading -----------------------------------------------------------------------------------


class Decode:
    """litdata's per-record transform: the encoded image through ``transform`` (a uint8 tensor)."""

    def __init__(self, transform: Callable, mode: str, where: str):
        self.transform, self.mode, self.where = transform, mode, where

    def __call__(self, record: dict) -> dict:
        from PIL import Image
        try:
            with Image.open(io.BytesIO(record["image"])) as image:
                x = self.transform(image.convert(self.mode))
        except (OSError, ValueError, SyntaxError) as err:  # written decodable, so the chunk is damaged
            raise DataError(f"shards: sample {record['index']} of {self.where} does not decode ({err})") from None
        return {"x": x, "y": record["label"], "index": record["index"]}


def collate(records: List[dict]) -> dict:
    return {"x": torch.stack([r["x"] for r in records]), "y": torch.as_tensor([r["y"] for r in records]),
            "index": torch.as_tensor([r["index"] for r in records])}


def open_stream(root: str, cache_dir: Optional[str], shuffle: bool = False, seed: int = 0, transform=None):
    """litdata's ``StreamingDataset`` over one split folder or URL."""
    from litdata import StreamingDataset
    try:
        return StreamingDataset(root, cache_dir=cache_dir, shuffle=shuffle, seed=seed, drop_last=True,
                                transform=transform)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise DataError(f"shards: cannot open {root} ({str(err).strip().splitlines()[0]})") from None


def random_access(root: str, cache_dir: Optional[str]):
    """A split addressed by sample: the whole split on every rank (litdata would otherwise size it
    to this rank's share when the process group is up)."""
    from litdata.utilities.env import _DistributedEnv
    stream = open_stream(root, cache_dir)
    stream.distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
    return stream


class ShardImages(ImageSamples):
    """A split read by random access (the test split): an :class:`ImageSamples`, so subsets, class
    selection, hold-out and evaluation work as for an image folder."""

    def __init__(self, root: str, labels, transform: Callable, label_map=None, *, cache_dir=None, rows=None,
                 stream=None, **kw):
        super().__init__(labels, transform, label_map, **kw)
        self.root, self.cache_dir = root, cache_dir
        self.rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows)
        self.stream = stream if stream is not None else random_access(root, cache_dir)

    def _open(self, i: int):
        from PIL import Image
        return Image.open(io.BytesIO(self._encoded(i)))

    def _encoded(self, i: int) -> bytes:
        """The encoded file of sample ``i``, as the shard holds it."""
        return self.stream[int(self.rows[i])]["image"]

    def where(self, i: int) -> str:
        return f"{self.root} sample {int(self.rows[i])}"

    def _take(self, idx, **changes) -> "ShardImages":
        s = self._settings(**changes)
        idx = np.asarray(idx, dtype=np.int64)
        return ShardImages(self.root, self.labels[idx], s.pop("transform"), s.pop("label_map"),
                           cache_dir=self.cache_dir, rows=self.rows[idx], stream=self.stream, **s)


# --- the training loader and its checkpointed position -----------------------------------------


@dataclass(frozen=True)
class ShardState:
    """Where a rank's stream stands inside an epoch, with the topology its order depends on:
    litdata deals chunks to ranks and loader workers, so an epoch goes on exactly only where
    ``world_size``, ``num_workers`` and ``batch_size`` are the ones it began with."""
    epoch: int
    samples: int  # samples this rank drew in the epoch
    world_size: int
    num_workers: int
    batch_size: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardState":
        return cls(**d)


class ShardPosition:
    """The loader's ``sampler`` as the trainer drives it: ``set_epoch(epoch, skip)`` points the
    next pass at ``epoch``, ``skip`` samples of this rank in (``consumed``: samples over all ranks,
    ``world_size`` times that). litdata deals an epoch by its topology, so a pass goes on only on
    the world it began on; :meth:`ShardLoader.load_state_dict` refuses another before any step."""

    elastic = True  # set_epoch takes ``consumed``, as the trainer counts a resumed pass

    def __init__(self, rank: int, world_size: int, seed: int):
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0, consumed: Optional[int] = None) -> None:
        if consumed is not None:
            if consumed % self.world_size:
                raise ConfigError(f"--resume: {consumed} samples of the epoch were trained, not a whole number "
                                  f"per rank of {self.world_size}; resume on the number of ranks that wrote it")
            skip = consumed // self.world_size
        self.epoch, self.skip = epoch, skip


class ShardLoader:
    """Batches ``(uint8 images, labels)`` of this rank's share of a :class:`ShardStream`, through
    litdata's ``StreamingDataLoader``; a pass started ``skip`` samples in continues the epoch's order
    from there (litdata's loader state). ``state_dict()`` / ``load_state_dict()`` are the
    :class:`ShardState` that a mid-epoch checkpoint keeps."""

    def __init__(self, split: "ShardStream", batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0):
        from litdata import StreamingDataLoader
        self.dataset, self.batch_size, self.world_size, self.num_workers = split, batch_size, world_size, num_workers
        self.sampler = ShardPosition(rank, world_size, seed)
        self.generator = torch.Generator().manual_seed(seed)  # seeds the workers' augmentations (start_epoch)
        self.stream = open_stream(split.root, split.cache_dir, shuffle=True, seed=seed,
                                  transform=Decode(split.transform, split.mode, split.root))
        found = self.stream.distributed_env.world_size
        if found != world_size:
            raise DataError(f"shards: litdata sees {found} rank(s), the run has {world_size}")
        self.loader = StreamingDataLoader(self.stream, batch_size=batch_size, num_workers=num_workers,
                                          collate_fn=collate, generator=self.generator,
                                          pin_memory=torch.cuda.is_available())
        self.drawn = 0  # samples this rank drew in the current pass, counted from the epoch's start
        self.saved: Optional[ShardState] = None  # a resumed checkpoint's position, checked when its pass starts

    def __len__(self) -> int:
        """Minibatches of a whole epoch on this rank (the same on every rank)."""
        return len(self.loader)

    def __iter__(self) -> Iterator:
        epoch, skip = self.sampler.epoch, self.sampler.skip
        self._check(epoch, skip)
        self.point(epoch, skip)
        self.drawn = skip
        for batch in self.loader:
            self.drawn += len(batch["y"])
            yield self.unpack(batch)

    def unpack(self, batch: dict):
        """``(x, y)`` of one collated batch; ``batch["index"]`` names each sample's source position."""
        return batch["x"], batch["y"]

    def point(self, epoch: int, skip: int) -> None:
        """litdata's loader at ``epoch`` (its epochs count from 1), ``skip`` samples of this rank in."""
        loader, workers = self.loader, max(1, self.num_workers)
        if not skip:
            loader.current_epoch, loader.restore = epoch, False  # its __iter__ steps to epoch + 1 and resets
            return
        state = self.stream.state_dict(skip, self.num_workers, self.batch_size)
        state["current_epoch"] = epoch + 1
        loader.load_state_dict({"dataset": state, "current_epoch": epoch + 1, "num_samples_yielded": skip,
                                "latest_worker_idx": (skip // self.batch_size - 1) % workers})

    def state_dict(self) -> dict:
        return ShardState(self.sampler.epoch, self.drawn, self.world_size, self.num_workers, self.batch_size,
                          self.sampler.seed).to_dict()

    def load_state_dict(self, state: dict) -> None:
        saved = ShardState.from_dict(state)
        now = ShardState(saved.epoch, saved.samples, self.world_size, self.num_workers, self.batch_size,
                         self.sampler.seed)
        if saved != now:
            raise ConfigError(f"--resume: the checkpoint stopped inside epoch {saved.epoch} of a shard stream read "
                              f"by {_topology(saved)}, this run has {_topology(now)}; litdata deals an epoch by "
                              f"that topology, so resume it there (or from an epoch's end)")
        self.saved = saved

    def _check(self, epoch: int, skip: int) -> None:
        saved, self.saved = self.saved, None
        if saved is not None and (saved.epoch, saved.samples) != (epoch, skip):
            raise ConfigError(f"--resume: the checkpoint's shard stream stood at epoch {saved.epoch}, sample "
                              f"{saved.samples} of this rank; the trainer resumes at epoch {epoch}, sample {skip}")


def _topology(s: ShardState) -> str:
    return f"{s.world_size} rank(s) x {s.num_workers} loader worker(s), micro batch {s.batch_size}, seed {s.seed}"


class ShardStream(Streamed):
    """The training split, streamed: it makes its own loader (:class:`ShardLoader`) and can be
    cut only by the converter (its samples are not addressed one by one while training)."""

    loader_class = ShardLoader  # a plugin may read the batches through a subclass

    def __init__(self, root: str, length: int, transform: Callable, mode: str, cache_dir: Optional[str] = None):
        self.root, self.length, self.transform, self.mode, self.cache_dir = root, length, transform, mode, cache_dir

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        raise TypeError("a streamed split is read through its loader (ShardStream.train_loader)")

    def _refuse(self, flag: str):
        raise DataError(f"shards: {flag} cannot cut the streamed training split of {self.root}; give it to "
                        f"recipes/make_shards.py when writing the shards")

    def subset(self, limit: Optional[int]) -> "ShardStream":
        if limit is not None and limit < self.length:
            self._refuse("--train-limit")
        return self

    def select_classes(self, classes: Sequence[int]):
        self._refuse("--classes")

    def split_off(self, n: int):
        if n > 0:
            self._refuse(f"--holdout {n}")
        return self, None

    def train_loader(self, batch_size: int, rank: int, world_size: int, seed: int,
                     num_workers: int = 0) -> "ShardLoader":
        loader = self.loader_class(self, batch_size, rank, world_size, seed, num_workers)
        if len(loader) == 0:
            raise DataError(f"shards: {self.root} holds {self.length} training samples, fewer than one global "
                            f"batch ({batch_size} x {world_size} ranks)")
        return loader


# --- the registered loader ---------------------------------------------------------------------


@DATASETS.register("shards")
def shards(name: str, data_dir: Optional[str] = None, img_size: Optional[int] = None,
           cache_dir: Optional[str] = None) -> Loaded:
    """Shards written by recipes/make_shards.py, from --data-dir (a folder, or an s3/gs/azure/hf URL)."""
    if not data_dir:
        raise DataError("shards needs --data-dir: the folder (or URL) recipes/make_shards.py wrote")
    meta = ShardMeta.read(data_dir, cache_dir)
    size = img_size or meta.img_size
    train_tf, test_tf = image_transforms(size, meta.native)
    train = ShardStream(join(data_dir, "train"), meta.train_samples, train_tf, meta.mode, cache_dir)
    test = ShardImages(join(data_dir, "val"), meta.val_labels, test_tf, mode=meta.mode, cache_dir=cache_dir)
    if len(test.stream) != len(meta.val_labels):
        raise DataError(f"shards: {join(data_dir, 'val')} holds {len(test.stream)} samples, {META} lists "
                        f"{len(meta.val_labels)}")
    return Loaded(train, test, Stats(meta.num_classes, meta.in_chans, size, meta.mean, meta.std, meta.class_names))


shards.internal_settings = ("name", "data_dir", "img_size")


# --- writing -----------------------------------------------------------------------------------


def encoded(ds: Dataset, i: int) -> bytes:
    """Sample ``i`` of a loaded split as an encoded image file: an image folder's or a Hugging Face
    dataset's own bytes (no re-encoding), in-memory images as PNG."""
    from .images import FolderImages, HFImages
    from .tensors import TensorImages
    if isinstance(ds, TensorImages):
        from PIL import Image
        out = io.BytesIO()
        array = ds.images[i].permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(out, format="PNG")
        return out.getvalue()
    if isinstance(ds, FolderImages):
        return Path(str(ds.paths[i])).read_bytes()
    if isinstance(ds, HFImages):
        cell = ds.ds[int(i)][ds.image_column]
        return cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()
    if isinstance(ds, ShardImages):
        return ds._encoded(i)
    raise DataError(f"cannot write shards of a {type(ds).__name__} dataset")


def label_of(ds: Dataset, i: int) -> int:
    label = int(ds.labels[i])
    label_map = getattr(ds, "label_map", None)
    return label_map[label] if label_map else label


def _readable(data: bytes) -> Optional[tuple]:
    """``(width, height)`` of an encoded image, or None when it does not decode."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.load()
        return size
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def write_split(ds: Dataset, order: Sequence[int], out: Path, chunk_bytes: str, chunk_size: Optional[int],
                where: str) -> tuple:
    """``ds``'s samples in ``order`` as litdata chunks under ``out``; returns ``(labels written,
    image sizes seen)``. Unreadable images are named on stderr and left out."""
    import sys

    from litdata.streaming.writer import BinaryWriter
    writer = BinaryWriter(str(out), chunk_size=chunk_size, chunk_bytes=None if chunk_size else chunk_bytes)
    labels, sizes = [], set()
    for i in order:
        data = encoded(ds, int(i))
        size = _readable(data)
        if size is None:
            print(f"dat-ds: skipping unreadable image {ds.where(int(i)) if hasattr(ds, 'where') else i} of {where}",
                  file=sys.stderr, flush=True)
            continue
        sizes.add(size)
        labels.append(label_of(ds, int(i)))
        writer.add_item(len(labels) - 1, {"image": data, "label": labels[-1], "index": int(i)})
    if not labels:
        raise DataError(f"{where}: no readable image to write")
    writer.done()
    writer.merge()
    return labels, sizes


def write_shards(info, out: str, seed: int = 0, chunk_bytes: str = "64MB",
                 chunk_size: Optional[int] = None) -> ShardMeta:
    """Write a loaded dataset (:class:`~.core.DatasetInfo`) as shards into the new folder ``out``:
    the training split in a random order seeded by ``seed``, the test split in its own order.
    Written beside ``out`` and renamed into place at the end, so a failure leaves nothing half-written."""
    import shutil
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"--out {out} exists and is not an empty folder")
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        order = np.random.default_rng(seed).permutation(len(info.train))
        train_labels, sizes = write_split(info.train, order, work / "train", chunk_bytes, chunk_size,
                                          f"{info.name} train")
        val_labels, val_sizes = write_split(info.test, range(len(info.test)), work / "val", chunk_bytes, chunk_size,
                                            f"{info.name} test")
        sizes |= val_sizes
        native = next(iter(sizes))[0] if len(sizes) == 1 and len(set(next(iter(sizes)))) == 1 else None
        meta = ShardMeta(info.name, info.num_classes, info.in_chans, info.img_size, native,
                         "L" if info.in_chans == 1 else "RGB", tuple(info.mean), tuple(info.std), len(train_labels),
                         tuple(val_labels), seed,
                         class_names=None if info.class_names is None else tuple(info.class_names))
        (work / META).write_text(meta.to_json())
        if target.exists():
            target.rmdir()
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return meta
