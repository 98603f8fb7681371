"""Data that stays where it lives: ``--data-placement local``.

In ``global`` placement (the default) every rank sees one dataset and reads its share of it
(:class:`~.loaders.ResumableSampler`). In ``local`` placement each rank reads only the folder it
holds, the setting the DAT paper starts from (data too large, or too private, to gather on one
machine): only gradients travel.

* **Folders.** ``--data-dir`` (or the path of an ``hf:`` dataset) is read on every rank as given:
  on a cluster the same path with other files on every node. It may name ``{rank}``,
  ``{local_rank}`` and ``{node_rank}`` (the launcher's ``CROSS_RANK``, torchrun's ``GROUP_RANK``,
  or ``NODE_RANK``), so one machine can stand in for several. Ranks that name the same folder on
  the same node split it (disjoint shards); no rank opens another folder's files.
* **Steps per epoch.** Every rank trains the smallest shard's number of minibatches (see
  :func:`agreed_batches` for why); the larger shards draw a new permutation each epoch, so their
  other samples come in later epochs.
* **Classes, shape, normalization** are agreed (:mod:`.agreement`): an ImageFolder's classes are
  the union of the folders' class names (so shards may hold different classes), integer labels
  are shared ids, Hugging Face ``ClassLabel`` names must match; image shapes must match; measured
  normalization statistics are pooled.
* **Evaluation** counts over the union of the folders' test sets, each folder's split among its
  ranks (:meth:`Placement.union`).
* **Resume**: bit for bit on the same ranks and folders; an epoch interrupted inside is not
  continued on another layout (:func:`check_resume`).
"""
from __future__ import annotations

import os
import socket
import string
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import dist, faults
from ..errors import ConfigError
from .agreement import agree
from .core import DATASETS, DataError, DatasetInfo, select_classes
from .loaders import _batch_collate, raw_batches

PLACEMENTS = ("global", "local")
PLACEHOLDERS = ("rank", "local_rank", "node_rank")
NODE_RANK_VARS = ("CROSS_RANK", "GROUP_RANK", "NODE_RANK")  # deepspeed's launcher, torchrun, others


def placeholders(text: Optional[str]) -> List[str]:
    """The ``{name}`` fields of ``text`` (``{{`` and ``}}`` are literal braces)."""
    if not text:
        return []
    try:
        return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as err:
        raise ValueError(f"{text!r}: {err} (a literal brace is written {{{{ or }}}})") from None


def check_placement(mode: str, data_dir: Optional[str], dataset: str) -> None:
    """``ValueError`` (one line) for an unknown mode, a placeholder in ``global`` placement or an
    unknown one in ``local``."""
    if mode not in PLACEMENTS:
        raise ValueError(f"--data-placement must be one of {', '.join(PLACEMENTS)}, got {mode!r}")
    for flag, text in (("--data-dir", data_dir), ("--dataset", dataset)):
        names = placeholders(text)
        if mode == "global" and any(n in PLACEHOLDERS for n in names):
            raise ValueError(f"{flag} {text}: {{rank}}, {{local_rank}} and {{node_rank}} name per-rank folders, "
                             f"which only --data-placement local reads")
        unknown = [n for n in names if n not in PLACEHOLDERS]
        if mode == "local" and unknown:
            raise ValueError(f"{flag} {text}: unknown placeholder {{{unknown[0]}}}; the placeholders are "
                             f"{{rank}}, {{local_rank}} and {{node_rank}}")


def node_rank() -> Optional[int]:
    """This node's rank as the launcher set it (``CROSS_RANK``, ``GROUP_RANK`` or ``NODE_RANK``), or None."""
    for var in NODE_RANK_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return None


def resolve(text: Optional[str], rank: int, local_rank: int, node: Optional[int]) -> Optional[str]:
    """``text`` with its placeholders filled for one rank."""
    if not text or not placeholders(text):
        return text
    if "node_rank" in placeholders(text) and node is None:
        raise ValueError(f"{text}: {{node_rank}} needs the launcher's node rank, and none of "
                         f"{', '.join(NODE_RANK_VARS)} is set")
    return text.format(rank=rank, local_rank=local_rank, node_rank=node)


@dataclass(frozen=True)
class Placement:
    """Which folder every rank reads (``local`` placement); the ranks of one folder split it."""
    rank: int
    folders: Tuple[str, ...]  # per rank: "NODE:PATH" of the folder it reads
    dataset: str  # --dataset as given (what the run and its checkpoints are called)
    source: str  # this rank's --dataset, placeholders filled (an hf: path)
    data_dir: Optional[str]  # this rank's --data-dir, placeholders filled

    @property
    def groups(self) -> Tuple[Tuple[int, ...], ...]:
        """The ranks of each folder, folders in the order of their first rank."""
        return tuple(tuple(r for r, f in enumerate(self.folders) if f == key) for key in dict.fromkeys(self.folders))

    @property
    def peers(self) -> Tuple[int, ...]:
        """The ranks that read this rank's folder (itself included)."""
        return next(g for g in self.groups if self.rank in g)

    def share(self) -> Tuple[int, int]:
        """``(this rank's index among its folder's ranks, their number)``: how the folder is dealt."""
        return self.peers.index(self.rank), len(self.peers)

    def folder(self, rank: Optional[int] = None) -> str:
        return self.folders[self.rank if rank is None else rank].partition(":")[2]

    def load(self, img_size: Optional[int], classes, train_limit: Optional[int], eval_limit: Optional[int],
             settings: dict) -> DatasetInfo:
        """This rank's folder, loaded as :func:`~dat_ds.data.load_dataset` loads a dataset, with the
        classes and normalization agreed between folders (collective: every rank calls it)."""
        settings = {k: v for k, v in settings.items() if v is not None}
        loaded, problem = None, ""
        try:
            loaded = DATASETS.get(self.source)(self.source, self.data_dir, img_size, **settings)
        except (DataError, ValueError, OSError) as err:  # one rank's folder: every rank stops with its line
            problem = f"rank {self.rank}: {err}" if len(self.folders) > 1 else str(err)
        problem = faults.agree(loaded is not None, problem)
        if problem is not None:
            raise DataError(problem)
        train, test, stats = loaded
        info = agree(DatasetInfo(name=self.dataset, train=train, test=test, settings=settings, **stats._asdict()),
                     self.folder())
        info = select_classes(info, classes)
        return replace(info, train=info.train.subset(train_limit), test=info.test.subset(eval_limit))

    def split_off(self, train: Dataset, n: int) -> Tuple[Dataset, Optional[Dataset]]:
        """``train.split_off(n)`` on every rank, agreed (collective): a folder too small for ``n`` stops
        every rank with its line, and so do folders of which some hold samples out and others none
        (the held-out check is a collective every rank takes part in)."""
        rest, held, problem = train, None, ""
        try:
            rest, held = train.split_off(n)
        except ValueError as err:
            problem = f"rank {self.rank} ({self.folder()}): {err}"
        every = dist.all_gather_object((problem, held is not None))
        problem = next((p for p, _ in every if p), "")
        if not problem and len({h for _, h in every}) > 1:
            empty = next(r for r, (_, h) in enumerate(every) if not h)
            problem = (f"--data-placement local: {self.folder(empty)} is too small to hold samples out for the "
                       f"held-out check (10% of its training set is 0); give --holdout N or --holdout 0")
        if problem:
            raise DataError(problem)
        return rest, held

    def layout(self, train_size: int) -> dict:
        """What a checkpoint records of the placement: the folders' ranks and training-set sizes
        (collective)."""
        sizes = dist.all_gather_object(int(train_size))
        return {"placement": "local", "groups": [list(g) for g in self.groups],
                "train": [sizes[g[0]] for g in self.groups]}

    def train_loader(self, ds: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
        """Shuffled batches of this rank's share of its folder, as many per epoch on every rank
        (:func:`agreed_batches`; collective)."""
        sizes = dist.all_gather_object(len(ds))
        batches = agreed_batches(sizes, self, batch_size)
        if self.rank == 0:
            shards = " / ".join(str(sizes[g[0]]) for g in self.groups)
            print(f"local data: {len(self.groups)} folder(s) of {shards} training samples; every rank trains "
                  f"{batches} minibatch(es) of {batch_size} per epoch, the smallest shard's", flush=True)
        peer, peers = self.share()
        sampler = LocalSampler(len(ds), peer, peers, batches * batch_size, self.rank, len(self.folders), seed)
        # as dat_ds.data.train_loader: workers start afresh each epoch, seeded by start_epoch
        return DataLoader(raw_batches(ds), batch_size=batch_size, sampler=sampler, drop_last=True,
                          collate_fn=_batch_collate, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available())

    def union(self, table: torch.Tensor) -> torch.Tensor:
        """Every folder's per-sample table, one after another (folders in the order of their first
        rank), each the sum over its ranks (every row is filled by one of them); on the CPU.
        Collective; moves ``world size x longest table`` entries."""
        if len(self.folders) == 1:
            return table.cpu()
        sizes = [int(n) for n in _gather(torch.tensor([len(table)], dtype=torch.int64, device=table.device))]
        padded = table.new_zeros((max(sizes), *table.shape[1:]))
        padded[:len(table)] = table
        parts = _gather(padded)
        return torch.cat([sum(parts[r] for r in g)[:sizes[g[0]]] for g in self.groups]).cpu()


def _gather(t: torch.Tensor) -> List[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.world_size())]
    tdist.all_gather(out, t)
    return out


def place(mode: str, data_dir: Optional[str], dataset: str) -> Optional[Placement]:
    """The run's :class:`Placement` (collective), or None in ``global`` placement."""
    if mode != "local":
        return None
    rank, node = dist.rank(), node_rank()
    source = resolve(dataset, rank, dist.local_rank(), node)
    data_dir = resolve(data_dir, rank, dist.local_rank(), node)
    path = data_dir or (source.partition(":")[2] if DATASETS.key(source) == "hf:" else None)
    where = os.path.realpath(path) if path else f"({source}'s own folder)"
    key = f"{socket.gethostname() if node is None else node}:{where}"
    return Placement(rank, tuple(dist.all_gather_object(key)), dataset, source, data_dir)


def agreed_batches(sizes: Sequence[int], placement: Placement, batch_size: int) -> int:
    """Minibatches per rank and epoch, the same on every rank: the smallest shard's.

    ``sizes``: every rank's training-set size. Why the smallest shard, not every shard resampled
    to a common length: gradients are averaged over ranks at every step, so each folder weighs
    the same in the update either way; the choice only sets what an epoch is. With the smallest
    shard no sample is drawn twice in an epoch (oversampling would repeat a small folder's
    samples inside each epoch), an epoch costs what the smallest folder allows, and a larger
    folder meets its other samples in later epochs (its order is a new permutation each epoch).
    """
    per_folder = [(sizes[g[0]] // len(g)) // batch_size for g in placement.groups]
    smallest = int(np.argmin(per_folder))
    if per_folder[smallest] == 0:
        group = placement.groups[smallest]
        raise DataError(f"--data-placement local: {placement.folder(group[0])} holds {sizes[group[0]]} training "
                        f"samples for {len(group)} rank(s), fewer than one micro batch of {batch_size} per rank "
                        f"(every rank trains the smallest shard's number of steps)")
    return per_folder[smallest]


class LocalSampler(Sampler[int]):
    """Rank ``peer`` of the ``peers`` ranks that read one folder of ``length`` samples reads
    positions ``peer, peer + peers, ...`` of the folder's epoch order (a permutation seeded by
    ``seed + epoch``, as :class:`~.loaders.ResumableSampler`'s), the first ``per_rank`` of them.

    With one folder for all ranks this is ``ResumableSampler``'s order, batch for batch.
    ``set_epoch(e, consumed=P)``: ``P`` samples over all ``world`` ranks were trained (a resume
    on the same ranks; another layout is refused before, :func:`check_resume`).
    """

    elastic = True  # set_epoch takes ``consumed``, as the trainer counts a resumed epoch

    def __init__(self, length: int, peer: int, peers: int, per_rank: int, rank: int, world: int, seed: int = 0):
        assert 0 <= peer < peers and per_rank * peers <= length
        self.length, self.peer, self.peers, self.per_rank = length, peer, peers, per_rank
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0, consumed: Optional[int] = None) -> None:
        """Epoch ``epoch`` without this rank's first ``skip`` samples (or ``consumed / world``)."""
        if consumed is not None:
            assert consumed % self.world == 0, "a resume on another number of ranks is refused before"
            skip = consumed // self.world
        self.epoch, self.skip = epoch, skip

    def order(self) -> torch.Tensor:
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)

    def __iter__(self) -> Iterator[int]:
        start = self.skip * self.peers + self.peer
        return iter(self.order()[start:self.per_rank * self.peers:self.peers].tolist())


# --- resume -------------------------------------------------------------------------------


def check_resume(marker: Optional[dict], meta: dict) -> None:
    """Refuse (one line) to continue an epoch interrupted inside on another data layout.

    The rule: a checkpoint from an epoch's end goes on on any number of ranks and folders (the next
    epoch starts every folder's order afresh). One from inside an epoch goes on only where the
    ranks, their folders' grouping and the folders' training-set sizes are the ones it was
    written with: its progress is counted in each folder's own order, which another layout deals
    differently. Global placement keeps its own rules (it resumes on any number of ranks).
    """
    if not marker:
        return
    position = marker.get("position") or (0, 0)
    saved = marker.get("meta", {}).get("placement")
    now = meta.get("placement")
    if not position[1] or saved == now:
        return
    raise ConfigError(f"--resume: the checkpoint stopped inside epoch {position[0]} with {_said(saved)}, this run "
                      f"has {_said(now)}; an interrupted epoch goes on only on the data layout it began on (resume "
                      f"it there, or from an epoch's end)")


def _said(layout: Optional[dict]) -> str:
    if layout is None:
        return "global placement"
    return f"{len(layout['groups'])} folder(s) of ranks {layout['groups']} with {layout['train']} training samples"
