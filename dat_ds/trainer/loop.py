"""One training epoch, one direction (paper Algorithm 1):

data -> oracle on ``engine.module`` (input gradients only, no communication) -> loss ->
``engine.backward`` (local gradients) -> compressor (the only gradient communication) ->
``engine.step``.

The oracle's step shape (:mod:`dat_ds.attacks.shapes`) decides how minibatches become steps;
the loop runs whatever shape the attack declares.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Tuple

import torch

from .. import attacks, compress, objectives
from ..attacks.shapes import StepContext
from ..data import to_device
from ..engine import autocast, exchange_gradients
from ..guard import StepGuard, skip_step
from ..speed import input_format
from ..syncs import HostCopy
from ..timing import Timers


@dataclass
class EpochState:
    """Where an epoch stands: what a mid-epoch checkpoint records and a resumed epoch starts from."""
    epoch: int = 0
    done: int = 0  # minibatches trained
    drawn: int = 0  # minibatches taken from the loader (a look-ahead shape holds one more, in ``carry``)
    carry: dict = field(default_factory=dict)
    # a pass resumed on another number of ranks: at ``done_base`` minibatches, ``consumed_base``
    # samples of the epoch's order had been trained (dat_ds.data.ResumableSampler counts in samples)
    consumed_base: int = 0
    done_base: int = 0
    regrouped: bool = False  # resumed from a checkpoint of another number of ranks

    def where(self) -> str:
        return f"epoch {self.epoch}, batch {self.done}"

    def consumed(self, minibatches: int, samples_per_minibatch: int) -> int:
        """Samples of the epoch's order (over all ranks) behind ``minibatches`` of this pass."""
        return self.consumed_base + (minibatches - self.done_base) * samples_per_minibatch


class Totals:
    """Running loss and byte counts of an epoch, kept on the device (no per-step host sync).

    ``skipped`` in :meth:`add` is a bool, or a 0-dim device bool when the step guard decided on
    the device (deferred): then the loss is masked there and the counts corrected on the device,
    read with the epoch's result. A non-finite loss never enters the mean. The progress bar shows
    the loss of 10 steps earlier, copied to the host without a stall."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.unseen = torch.zeros((), device=device)  # samples of steps skipped on the device
        self.late_skipped = torch.zeros((), device=device)
        self.seen = self.bytes = self.steps = self.skipped = 0
        self._shown = HostCopy()

    def add(self, loss, n, sent, engine, progress, skipped=False):
        if isinstance(skipped, torch.Tensor) or not skipped:
            # a non-finite loss (a micro-step of a step skipped later, under accumulation) and a
            # step skipped on the device stay out of the mean, masked and counted on the device
            loss = loss.detach().float()
            drop = ~torch.isfinite(loss)
            if isinstance(skipped, torch.Tensor):
                drop = drop | skipped
                self.late_skipped += skipped
            self.loss += torch.where(drop, 0.0, loss * n)
            self.unseen += drop * n
            self.seen += n
        else:  # skipped on the host: its loss stays out of the mean
            self.skipped += 1
        self.bytes, self.steps = self.bytes + sent, self.steps + 1
        if progress is not None:
            progress.update(1)
            if self.steps % 10 == 0:
                if self._shown.pending:
                    progress.set_postfix(loss=f"{self._shown.get()[0]:.3f}", lr=f"{engine.get_lr()[0]:.2e}")
                self._shown.put(loss.detach().float())

    def result(self) -> dict:
        return {"train_loss": (self.loss / (self.seen - self.unseen).clamp(min=1)).item(),
                "bytes_sent": self.bytes, "micro_steps": self.steps}

    def state_dict(self) -> dict:
        return {"loss": self.loss.item(), "seen": self.seen - int(self.unseen.item()), "bytes": self.bytes,
                "steps": self.steps, "skipped": self.skipped + int(self.late_skipped.item())}

    def load_state_dict(self, state: dict) -> None:
        self.loss.fill_(state["loss"])
        self.unseen.zero_()
        self.late_skipped.zero_()
        self.seen, self.bytes, self.steps = state["seen"], state["bytes"], state["steps"]
        self.skipped = state.get("skipped", 0)


def update(engine, compressor: compress.Compressor, timers: Timers, loss: torch.Tensor,
           guard: Optional[StepGuard] = None, where: str = "") -> Tuple[int, bool]:
    """Backward, gradient exchange at accumulation boundaries, optimizer step.

    Returns ``(bytes sent, skipped)``: with a ``guard``, a step whose loss or gradients are not
    finite on any rank is skipped on every rank (no exchange, no update). With the guard's
    deferred agreement, ``skipped`` is a 0-dim device bool: the step ran gated (no update).
    """
    with timers("backward"):
        engine.backward(loss)
    sent, skipped_before = 0, engine.skipped_steps
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary and guard is not None and guard.deferred:
        return _gated_step(engine, compressor, timers, loss, guard, where)
    if boundary:
        if guard is not None:
            with timers("step"):
                skip = guard.agree(loss, [p.grad for p in engine.module.parameters() if p.grad is not None])
            if skip:
                with timers("step"):
                    skip_step(engine)
                return 0, guard.stepped(skipped_before, where)
        with timers("codec"):  # encode + decode; the collectives' own time moves to "comm"
            stats = exchange_gradients(engine, compressor)
        timers.move("codec", "comm", stats.comm_seconds, stats.comm_events)
        sent = stats.bytes_sent
    with timers("step"):
        engine.step()
    skipped = guard.stepped(skipped_before, where) if guard is not None and boundary else False
    return sent, skipped


def _gated_step(engine, compressor, timers: Timers, loss: torch.Tensor, guard: StepGuard, where: str):
    """The optimizer step with the agreement kept on the device (no host read of this step)."""
    with timers("step"):
        skip = guard.agree_deferred(loss, [p.grad for p in engine.module.parameters() if p.grad is not None], where)
    with timers("codec"):
        stats = exchange_gradients(engine, compressor)
    timers.move("codec", "comm", stats.comm_seconds, stats.comm_events)
    with timers("step"):
        guard.zero_grads_where(skip, engine)
        opt = engine.optimizer
        opt.gate = (~skip).float()
        try:
            engine.step()
        finally:
            opt.gate = None
    return stats.bytes_sent, skip


def step_context(engine, timers: Timers, carry: Optional[dict] = None) -> StepContext:
    """What a step shape may use: ``engine.module`` for the attack, timers, the engine's autocast."""
    return StepContext(engine.module, timers, lambda: autocast(engine), {} if carry is None else carry)


def train_epoch(engine, loader, attack: attacks.Attack, compressor: compress.Compressor, timers: Timers,
                objective: Optional[objectives.Objective] = None, progress=None,
                guard: Optional[StepGuard] = None, state: Optional[EpochState] = None,
                totals: Optional[Totals] = None, at_boundary: Optional[Callable] = None, ema=None,
                batches: Optional[int] = None, views: int = 1) -> dict:
    """One pass over this rank's shard; returns the mean loss, bytes sent, the step count and
    ``"stopped": True`` when ``at_boundary`` ended it early.

    ``at_boundary(state, totals)`` runs after every optimizer step that completes a minibatch (all
    replays of Free-m, a full gradient accumulation) and returns True to stop; ``state`` and
    ``totals`` resume an epoch part-way (the loader must then start at ``state.drawn``).
    ``batches`` caps the minibatches of the pass (:mod:`dat_ds.trainer.plan`: a pass ends on an
    optimizer step); None trains the whole loader. ``views`` > 1 puts each image that many times
    in its minibatch (:func:`repeated`).
    """
    state = state or EpochState()
    totals = totals or Totals(engine.device)
    objective = objective or objectives.Madry()
    ctx = step_context(engine, timers, state.carry)
    batches = repeated(_counted(_to_device(loader, engine.device, input_format(engine.module)), state, batches), views)
    if guard is not None:
        guard.prepare(compressor, attack.shape, ema)
    for x, y, micro_steps in attack.shape.minibatches(ctx, batches, attack):
        boundary = False
        for x_adv, after in micro_steps:
            if guard is not None:
                guard.begin_micro_step()
            with timers("forward"):
                loss = objective(engine, x, x_adv, y)
            boundary = engine.is_gradient_accumulation_boundary()
            sent, skipped = update(engine, compressor, timers, loss, guard, state.where())
            if ema is not None and boundary and isinstance(skipped, torch.Tensor):
                with timers("step"):
                    ema.update(gate=(~skipped).float())
            elif ema is not None and boundary and not skipped:
                with timers("step"):
                    ema.update()
            if after is not None:
                after(skipped)
            totals.add(loss, len(y), sent, engine, progress, skipped)
        state.done += 1
        if boundary and at_boundary is not None and at_boundary(state, totals):
            if guard is not None:
                guard.settle()
            return {**totals.result(), "stopped": True}
    if guard is not None:
        guard.settle()  # the last step's agreement: counted before anyone reads the counts
    return totals.result()


def _to_device(loader, device, memory_format=torch.preserve_format) -> Iterator:
    for x, y in loader:
        yield to_device(x, y, device, memory_format)


def repeated(batches: Iterator, views: int) -> Iterator:
    """Each minibatch with every image ``views`` times (batch augmentation, Hoffer et al. 2020), repeated
    on the device after the copy there: the attack's random start makes each copy its own adversarial
    view, and the update averages over all of them. The loader, the sampler and the epoch's position
    still count images once. With one view the batches pass untouched, no extra generator in the step."""
    if views == 1:
        return batches
    return ((torch.cat([x] * views), torch.cat([y] * views)) for x, y in batches)  # cat keeps channels-last


def _counted(batches: Iterator, state: EpochState, limit: Optional[int]) -> Iterator:
    """``batches`` up to ``limit`` drawn in the pass (a resumed pass has drawn some already)."""
    while limit is None or state.drawn < limit:
        batch = next(batches, None)
        if batch is None:
            return
        state.drawn += 1
        yield batch
