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

from .. import dist
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

    def to_dict(self) -> dict:
        return {**asdict(self), "position": list(self.position)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClientState":
        position = d.get("position") or (d["epoch"] + 1, 0)
        return cls(d["epoch"], tuple(position), RunTotals(**d["totals"]), d.get("meta", {}), d.get("metrics") or {},
                   d.get("watch", {}), d.get("nonfinite_consecutive", 0))


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

    def to_dict(self) -> dict:
        out = {"buffers": self.buffers, "attack": self.attack, "compressor": self.compressor}
        if self.partial is not None:
            out["partial"] = asdict(self.partial)
        if self.carry:
            out["carry"] = self.carry
        if self.ema:
            out["ema"] = self.ema
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RankState":
        carry = d.get("carry", {})
        if "pending" in d:  # written before step shapes saved their carry by name
            carry = dict(zip(("x", "y", "x_adv"), d["pending"]))
        partial = PartialEpoch(**d["partial"]) if d.get("partial") else None
        return cls(d.get("buffers", {}), d.get("attack", {}), d.get("compressor", {}), partial, carry,
                   d.get("ema", {}))


@dataclass
class Progress:
    """What survives from epoch to epoch of one run."""
    totals: RunTotals
    watch: OverfitWatch
    row: dict = field(default_factory=dict)
    skipped_at_start: int = 0  # engine.skipped_steps when the current epoch began


def capture(engine, attack, compressor, state: Optional[EpochState] = None, totals: Optional[Totals] = None,
            timers=None, progress: Optional[Progress] = None, ema=None) -> RankState:
    """This rank's state now; with ``state``/``totals``/``timers`` also the epoch in progress."""
    rank = RankState({name: b.detach().clone() for name, b in engine.module.named_buffers()},
                     attack.state_dict(), compressor.state_dict())
    if ema is not None:
        rank.ema = ema.state_dict()
    if state is not None:
        rank.partial = PartialEpoch(totals.state_dict(), state.drawn, dict(timers.seconds),
                                    progress.skipped_at_start)
        ctx_carry = _carry_context(engine, state)
        rank.carry = attack.shape.carry_state(ctx_carry, attack)
    return rank


def _carry_context(engine, state: EpochState):
    from .loop import step_context
    return step_context(engine, None, state.carry)


def save(engine, ckpt_dir: Path, state: EpochState, progress: Progress, meta: dict, rank: RankState,
         guard, best: bool = False) -> None:
    """A checkpoint at ``state``: an epoch's end when ``state.done == 0`` (of the next epoch)."""
    epoch_end = rank.partial is None
    tag = f"epoch{state.epoch - 1:04d}" if epoch_end else f"epoch{state.epoch:04d}-batch{state.done:06d}"
    client = ClientState(state.epoch - 1, (state.epoch, state.done), progress.totals, meta, progress.row,
                         vars(progress.watch), guard.consecutive)
    save_checkpoint(engine, ckpt_dir, tag, client.to_dict(), rank.to_dict(), best=best,
                    position=(state.epoch, state.done))


def resume(engine, ckpt_dir: Path, meta: dict, attack, compressor, progress: Progress, guard, ema=None
           ) -> Tuple[EpochState, Optional[PartialEpoch]]:
    """Load the newest complete checkpoint into the engine, the attack, the compressor, ``progress``
    and ``guard``; returns where to start and the partial epoch (None at an epoch's end)."""
    picked = None
    if dist.is_main():
        try:
            picked = pick_checkpoint(ckpt_dir, meta, dist.world_size())
        except ConfigError as err:
            picked = str(err)
    picked = dist.broadcast_object(picked)
    if isinstance(picked, str):
        raise ConfigError(picked)
    if picked is None:
        return EpochState(), None
    client_dict, rank_dict = load_checkpoint(engine, ckpt_dir, picked[0])
    client, rank = ClientState.from_dict(client_dict), RankState.from_dict(rank_dict)
    buffers = dict(engine.module.named_buffers())
    for name, value in rank.buffers.items():
        buffers[name].data.copy_(value)
    attack.load_state_dict(rank.attack)
    compressor.load_state_dict(rank.compressor)
    if ema is not None and rank.ema:
        ema.load_state_dict(rank.ema)
    progress.watch.load_state_dict(client.watch)
    progress.totals, progress.row = client.totals, client.metrics
    guard.consecutive = client.nonfinite_consecutive
    epoch, done = client.position
    partial = rank.partial if done else None
    begin = EpochState(epoch, done, partial.drawn if partial else 0)
    if done:
        attack.shape.load_carry(_carry_context(engine, begin), rank.carry, engine.device)
    return begin, partial
