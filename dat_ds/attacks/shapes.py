"""Step shapes: how a training oracle turns the loader's minibatches into optimizer steps.

The training loop runs shapes, not attack names. Each attack declares its shape:

| shape | oracle | per minibatch |
|---|---|---|
| :class:`Plain` | PGD, FGSM-RS, noise, none, TRADES, Smooth-AT | attack, then one update |
| :class:`Replay` | Free-m | ``m`` updates, each backward also moving the carried perturbation |
| :class:`LookAhead` | ConAdv | the attack on minibatch t + 1 (stale weights) runs while update t does |

A shape yields ``(x, y, micro_steps)`` per minibatch, where ``micro_steps`` yields
``(x_adv, after)``: the loop computes the loss on ``x_adv``, runs the update, then calls
``after(skipped)`` (or nothing when ``after`` is None). What a shape keeps between minibatches
(ConAdv's look-ahead batch) lives in ``ctx.carry`` and is saved by mid-epoch checkpoints through
:meth:`StepShape.carry_state`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..timing import Timers

MicroStep = Tuple[torch.Tensor, Optional[Callable[[bool], None]]]


@dataclass
class StepContext:
    """What a shape may use: the model attacks run on (``engine.module``), phase timers, the
    engine's autocast, and ``carry`` (state a mid-epoch checkpoint must keep)."""
    model: nn.Module
    timers: Timers = field(default_factory=Timers)
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    carry: dict = field(default_factory=dict)


class StepShape:
    """Plain AT by default; subclasses change how minibatches become steps.

    ``device_skip``: the shape's ``after`` callbacks (if any) need not know on the host whether a
    step was skipped, so the step guard may keep that decision on the device."""

    device_skip = True

    def updates_per_minibatch(self, attack) -> int:
        return 1

    def minibatches(self, ctx: StepContext, batches: Iterator, attack) -> Iterator:
        raise NotImplementedError

    def carry_state(self, ctx: StepContext, attack) -> dict:
        """Tensors of ``ctx.carry`` a mid-epoch checkpoint saves (none for most shapes)."""
        return {}

    def load_carry(self, ctx: StepContext, state: dict, device) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} carries nothing between minibatches, got {', '.join(state)}")


class Plain(StepShape):
    """Attack the minibatch with the current weights, then one update."""

    def minibatches(self, ctx, batches, attack):
        for x, y in batches:
            with ctx.timers("attack"), ctx.autocast():
                x_adv = attack.perturb(ctx.model, x, y)
            yield x, y, ((x_adv, None),)


class Replay(StepShape):
    """Free-m: each minibatch replayed ``attack.steps`` times; the attack exposes
    ``adversarial_input(x)`` (a leaf that collects the input gradient of the training backward)
    and ``update(x, x_adv)`` (moves the carried perturbation)."""

    device_skip = False  # a skipped replay must not move the perturbation: the host decides

    def updates_per_minibatch(self, attack) -> int:
        return attack.steps

    def minibatches(self, ctx, batches, attack):
        for x, y in batches:
            yield x, y, self._replays(ctx, attack, x)

    @staticmethod
    def _replays(ctx, attack, x) -> Iterator[MicroStep]:
        for _ in range(attack.steps):
            x_adv = attack.adversarial_input(x)

            def after(skipped: bool, x_adv=x_adv) -> None:
                if not skipped:  # a non-finite input gradient would poison the perturbation for good
                    with ctx.timers("attack"):
                        attack.update(x, x_adv)
            yield x_adv, after


class LookAhead(StepShape):
    """ConAdv: minibatch t + 1 is attacked with the weights before update t, beside it.

    The attack exposes ``launch(model, x, y) -> handle``, ``collect(handle) -> x_adv`` and
    ``overlaps(x)`` (whether it runs beside the update, on a second CUDA stream).
    ``ctx.carry["pending"]`` holds the look-ahead minibatch and its attack while a minibatch
    trains; a checkpoint saves it as ``x, y, x_adv`` and a resumed epoch starts from it.
    """

    def minibatches(self, ctx, batches, attack):
        resumed = ctx.carry.pop("pending", None)
        if resumed is not None:
            (x, y), handle = resumed
            current = (x, y)
        else:
            current = next(batches, None)
            if current is None:
                return
            handle = self._launch(ctx, attack, *current)
        for following in batches:
            x_adv = attack.collect(handle)
            handle = self._launch(ctx, attack, *following)  # runs beside the update of `current` on a GPU
            ctx.carry["pending"] = (following, handle)
            yield current[0], current[1], ((x_adv, None),)
            current = following
        ctx.carry.pop("pending", None)
        yield current[0], current[1], ((attack.collect(handle), None),)

    @staticmethod
    def _launch(ctx, attack, x, y):
        """Start the attack; on a side stream (``attack.overlaps(x)``) the time is its own events
        there (the main stream only sees the enqueue), read when the timers are."""
        if attack.overlaps(x):
            with ctx.autocast():
                handle = attack.launch(ctx.model, x, y)
            if handle[2] is not None:
                ctx.timers.add("attack", events=[handle[2]])
            return handle
        with ctx.timers("attack"), ctx.autocast():
            return attack.launch(ctx.model, x, y)

    def carry_state(self, ctx, attack) -> dict:
        pending = ctx.carry.get("pending")
        if pending is None:
            return {}
        (x, y), handle = pending
        return {"x": x, "y": y, "x_adv": attack.collect(handle)}

    def load_carry(self, ctx, state, device) -> None:
        if state:
            x, y, x_adv = (state[k].to(device) for k in ("x", "y", "x_adv"))
            ctx.carry["pending"] = ((x, y), (x_adv, None, None))
