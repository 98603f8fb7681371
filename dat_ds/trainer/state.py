"""Checkpoint state as typed pieces, built and read here only.

A checkpoint holds DeepSpeed's files (weights, optimizer, LR schedule, step counts, and our
:class:`ClientState`) plus one ``rank{r}.pt`` per rank with that rank's :class:`RankState` and
RNG states (:mod:`dat_ds.checkpoint` writes and verifies the files; this module decides what goes
in them). Every piece is plain numbers, strings and tensors, so it loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.distributed.checkpoint.stateful import Stateful

from .. import dist
from ..seeding import derived_seed, seed_everything
from ..engine import ConfigError, load_checkpoint, pick_checkpoint, save_checkpoint
from .holdout import OverfitWatch
from .loop import EpochState, Totals


@dataclass
class RunTotals:
    """Sums over the epochs trained so far (what ``summary.json`` reports)."""
    compute_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent_per_rank: int = 0


@dataclass
class ClientState:
    """What DeepSpeed saves beside the weights (the same on every rank)."""
    epoch: int  # the last epoch completed (-1 before the first)
    position: Tuple[int, int]  # (epoch to run next, minibatches of it already trained)
    totals: RunTotals
    meta: dict  # model and data settings, so evaluation can rebuild the model
    metrics: dict  # the last epoch's metrics row
    watch: dict  # the held-out check's state (best epoch)
    nonfinite_consecutive: int = 0
    consumed: Optional[int] = None  # inside an epoch: samples of its order trained, over all ranks

    def to_dict(self) -> dict:
        return {**asdict(self), "position": list(self.position)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClientState":
        position = d.get("position") or (d["epoch"] + 1, 0)
        return cls(d["epoch"], tuple(position), RunTotals(**d["totals"]), d.get("meta", {}), d.get("metrics") or {},
                   d.get("watch", {}), d.get("nonfinite_consecutive", 0), d.get("consumed"))


@dataclass
class PartialEpoch:
    """A mid-epoch checkpoint's view of the epoch in progress, on this rank."""
    totals: dict
    drawn: int
    timers: dict
    skipped_at_start: int


@dataclass
class RankState:
    """Per-rank state beyond the weights: buffers (BatchNorm running statistics differ per rank,
    and the attacks use them), the attack's state (Free-m perturbation, ConAdv weight history),
    the compressor's (error feedback, momentum), and inside an epoch its partial totals and what
    the step shape carries (ConAdv's look-ahead minibatch with its attack)."""
    buffers: dict
    attack: dict
    compressor: dict
    partial: Optional[PartialEpoch] = None
    carry: dict = field(default_factory=dict)
    ema: dict = field(default_factory=dict)  # the weights' EMA (dat_ds.ema), when the run keeps one
    loader: dict = field(default_factory=dict)  # inside an epoch: a stateful loader's position (dat_ds.data.shards)

    def to_dict(self) -> dict:
        out = {"buffers": self.buffers, "attack": self.attack, "compressor": self.compressor}
        if self.partial is not None:
            out["partial"] = asdict(self.partial)
        if self.carry:
            out["carry"] = self.carry
        if self.ema:
            out["ema"] = self.ema
        if self.loader:
            out["loader"] = self.loader
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RankState":
        carry = d.get("carry", {})
        if "pending" in d:  # written before step shapes saved their carry by name
            carry = dict(zip(("x", "y", "x_adv"), d["pending"]))
        partial = PartialEpoch(**d["partial"]) if d.get("partial") else None
        return cls(d.get("buffers", {}), d.get("attack", {}), d.get("compressor", {}), partial, carry,
                   d.get("ema", {}), d.get("loader", {}))


@dataclass
class Progress:
    """What survives from epoch to epoch of one run."""
    totals: RunTotals
    watch: OverfitWatch
    row: dict = field(default_factory=dict)
    skipped_at_start: int = 0  # engine.skipped_steps when the current epoch began


def capture(engine, attack, compressor, state: Optional[EpochState] = None, totals: Optional[Totals] = None,
            timers=None, progress: Optional[Progress] = None, ema=None, loader=None) -> RankState:
    """This rank's state now; with ``state``/``totals``/``timers`` also the epoch in progress (and the
    position of a ``loader`` that keeps one, torch's ``Stateful``)."""
    rank = RankState({name: b.detach().clone() for name, b in engine.module.named_buffers()},
                     attack.state_dict(), compressor.state_dict())
    if ema is not None:
        rank.ema = ema.state_dict()
    if state is not None:
        rank.partial = PartialEpoch(totals.state_dict(), state.drawn, dict(timers.seconds),
                                    progress.skipped_at_start)
        ctx_carry = _carry_context(engine, state)
        rank.carry = attack.shape.carry_state(ctx_carry, attack)
        if isinstance(loader, Stateful):
            rank.loader = loader.state_dict()
    return rank


def _carry_context(engine, state: EpochState):
    from .loop import step_context
    return step_context(engine, None, state.carry)


def save(engine, ckpt_dir: Path, state: EpochState, progress: Progress, meta: dict, rank: RankState,
         guard, best: bool = False) -> None:
    """A checkpoint at ``state``: an epoch's end when ``state.done == 0`` (of the next epoch)."""
    epoch_end = rank.partial is None
    tag = f"epoch{state.epoch - 1:04d}" if epoch_end else f"epoch{state.epoch:04d}-batch{state.done:06d}"
    batch = meta.get("batch", {})
    consumed = None if epoch_end else state.consumed(state.done, batch.get("micro", 0) * batch.get("world_size", 0))
    client = ClientState(state.epoch - 1, (state.epoch, state.done), progress.totals, meta, progress.row,
                         vars(progress.watch), guard.consecutive, consumed)
    save_checkpoint(engine, ckpt_dir, tag, client.to_dict(), rank.to_dict(), best=best,
                    position=(state.epoch, state.done))


def pick(ckpt_dir: Path, meta: dict) -> Optional[Tuple[str, dict]]:
    """``(tag, marker)`` of the checkpoint ``--resume`` takes (rank 0 picks, every rank gets its
    answer), or None when there is none; refusals raise :class:`ConfigError` on every rank."""
    picked = None
    if dist.is_main():
        try:
            picked = pick_checkpoint(ckpt_dir, meta)
        except ConfigError as err:
            picked = str(err)
    picked = dist.broadcast_object(picked)
    if isinstance(picked, str):
        raise ConfigError(picked)
    return picked


def resume(engine, ckpt_dir: Path, picked: Optional[Tuple[str, dict]], attack, compressor, progress: Progress,
           guard, ema=None, seed: int = 0, loader=None) -> Tuple[EpochState, Optional[PartialEpoch]]:
    """Load checkpoint ``picked`` into the engine, the attack, the compressor, ``progress`` and
    ``guard``; returns where to start and the partial epoch (None at an epoch's end).

    Written by another number of ranks, each new rank's state is mapped from the old ranks' (see
    :func:`mapped_rank_state`) and the epoch goes on from the samples its ranks had trained
    (``EpochState.consumed_base``; the caller turns it into this world's minibatches).
    """
    if picked is None:
        if dist.is_main():
            print(f"--resume: no checkpoint in {ckpt_dir}; starting fresh", flush=True)
        return EpochState(), None
    tag, marker = picked
    saved_world = marker.get("world_size", dist.world_size())
    same_world = saved_world == dist.world_size()
    client_dict, rank_dict = load_checkpoint(engine, ckpt_dir, tag, own_rank=same_world)
    client = ClientState.from_dict(client_dict)
    rank = RankState.from_dict(rank_dict) if same_world else mapped_rank_state(
        Path(ckpt_dir) / tag, saved_world, compressor, seed, engine.global_steps)
    if same_world:  # pooled at every save: the same on every rank, but kept per rank as written
        buffers = dict(engine.module.named_buffers())
        for name, value in rank.buffers.items():
            buffers[name].data.copy_(value)
    attack.load_state_dict(rank.attack)
    if same_world:
        compressor.load_state_dict(rank.compressor)
    else:
        compressor.load_merged_state(rank.compressor)
    if ema is not None and rank.ema:
        ema.load_state_dict(rank.ema)
    if rank.loader and isinstance(loader, Stateful):
        loader.load_state_dict(rank.loader)  # refuses a position this loader cannot continue
    progress.watch.load_state_dict(client.watch)
    progress.totals, progress.row = client.totals, client.metrics
    guard.consecutive = client.nonfinite_consecutive
    epoch, done = client.position
    partial = rank.partial if done else None
    if dist.is_main():
        print(f"resuming from {Path(ckpt_dir) / tag} (epoch {epoch}, batch {done}, optimizer step "
              f"{engine.global_steps})", flush=True)
    if not same_world:
        saved_batch = marker.get("meta", {}).get("batch", {})
        consumed = client.consumed if client.consumed is not None else done * saved_batch.get("micro", 0) * saved_world
        return EpochState(epoch, consumed_base=consumed if done else 0, regrouped=bool(done)), partial
    begin = EpochState(epoch, done, partial.drawn if partial else 0)
    if done:
        if client.consumed is not None:
            begin.consumed_base, begin.done_base = client.consumed, done
        attack.shape.load_carry(_carry_context(engine, begin), rank.carry, engine.device)
    return begin, partial


def mapped_rank_state(tag_dir: Path, saved_world: int, compressor, seed: int, step: int) -> RankState:
    """This rank's state from a checkpoint of ``saved_world`` ranks, by documented rules:

    * RNG streams: re-derived from the run's seed, this rank and the optimizer step (no two
      ranks, and no two resumes at different steps, share a stream);
    * BatchNorm statistics and the EMA: pooled at every save, so rank 0's (the same on all);
    * the compressor's state: :meth:`Compressor.merge_states` (floating-point state averaged,
      so what the exchange averages is preserved);
    * the attack's state (Free-m's perturbation, ConAdv's weight history): old rank
      ``rank mod saved_world``'s; ConAdv's look-ahead batch is not carried over (its samples are
      trained again from the epoch's order);
    * the epoch's partial totals (loss, bytes) and a stateful loader's position: old rank
      ``rank mod saved_world``'s (a loader that cannot go on on this world refuses it).
    """
    old = [RankState.from_dict(torch.load(tag_dir / f"rank{r}.pt", weights_only=True)) for r in range(saved_world)]
    mine = old[dist.rank() % saved_world]
    seed_everything(derived_seed(seed, dist.rank(), step))
    return RankState(old[0].buffers, mine.attack, type(compressor).merge_states([o.compressor for o in old]),
                     mine.partial, {}, old[0].ema, mine.loader)
