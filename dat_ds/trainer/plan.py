"""How a run's minibatches become passes over the data, planned once at start.

Two rules, both about counting updates honestly:

* **Every pass ends on an optimizer step.** With gradient accumulation ``g``, a pass trains a
  multiple of ``g`` micro-steps (the ragged end is dropped, as ``drop_last`` drops a ragged
  batch), so no accumulation runs across a pass's end, an end-of-pass checkpoint never holds a
  partial gradient, and the schedule plans exactly the steps that happen.
* **``--epochs`` means epochs of updates.** Free-m replays each minibatch ``m`` times, so a run
  makes ``epochs / m`` passes; when ``m`` does not divide ``epochs`` the last pass takes only the
  share of the data that keeps the update count equal to natural training's at the same epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class PassPlan:
    """Minibatches trained in each pass, and the optimizer steps they make."""
    batches: Tuple[int, ...]  # minibatches (per rank) trained in each pass
    replays: int  # micro-steps per minibatch (Free-m: m; otherwise 1)
    gas: int  # gradient accumulation steps
    updates_per_epoch: int  # optimizer steps of one natural epoch (what the schedule calls an epoch)

    @property
    def passes(self) -> int:
        return len(self.batches)

    @property
    def updates(self) -> int:
        return sum(self.batches) * self.replays // self.gas

    @property
    def schedule_epochs(self) -> float:
        """The run's length in natural epochs of optimizer steps (the LR schedule's unit)."""
        return self.updates / self.updates_per_epoch


def plan_passes(loader_batches: int, epochs: int, replays: int = 1, gas: int = 1) -> PassPlan:
    """The plan for ``epochs`` epochs over a loader of ``loader_batches`` minibatches per rank.

    >>> plan_passes(429, 3, gas=8).batches  # 53 steps a pass, 5 micro-batches dropped
    (424, 424, 424)
    >>> plan_passes(100, 5, replays=4).batches  # Free-4 for 5 epochs: 500 updates, not 800
    (100, 25)
    """
    step = gas // math.gcd(replays, gas)  # minibatches that make a whole number of optimizer steps
    natural = loader_batches // gas * gas  # micro-steps of one natural epoch
    if natural == 0 or loader_batches < step:
        raise ValueError(f"an epoch has {loader_batches} minibatch(es) per rank, fewer than the {gas} one optimizer "
                         f"step accumulates (gradient_accumulation_steps); raise --train-limit or lower the "
                         f"accumulation or the micro batch")
    full = loader_batches // step * step
    left, batches = epochs * natural, []
    while left >= step * replays:
        take = min(full, left // replays // step * step)
        batches.append(take)
        left -= take * replays
    return PassPlan(tuple(batches), replays, gas, natural // gas)
