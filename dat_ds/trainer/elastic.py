"""Resuming on another number of ranks: the batch, the schedule and the epoch's position.

A checkpoint written by ``W`` ranks resumes on ``W'``. What carries over, and by which rule:

* **The global batch** is kept where this world can make it by changing the gradient
  accumulation (``global % (micro x W') == 0``); otherwise the micro batch and accumulation of
  the ds_config are kept, the global batch becomes ``micro x accumulation x W'`` and the
  config's LR rule (``lr_rule`` / ``base_batch_size``) re-derives the peak LR for it.
* **The schedule** goes on from the samples trained so far: its step becomes
  ``samples trained / new global batch``.
* **The epoch** goes on with exactly the samples of its order that no rank trained
  (:class:`dat_ds.data.ResumableSampler` counts in samples), dealt to the new ranks; the pass
  ends, as every pass does, on an optimizer step (the ragged tail of less than one global batch
  is dropped, as ``drop_last`` drops a ragged batch).
* **Per-rank state** (RNG, BatchNorm statistics, compressor, attack): see
  :func:`dat_ds.trainer.state.mapped_rank_state`.

Only ``W' = W`` is bit-exact against an uninterrupted run.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from .. import dist
from ..errors import ConfigError
from .loop import EpochState
from .plan import PassPlan


def adapt_batch(ds_cfg: dict, world: int, micro: int, gas: int, marker: Optional[dict]) -> Tuple[dict, int, int, str]:
    """``(ds_cfg, gas, global batch, what happened)`` for resuming ``marker``'s checkpoint on ``world`` ranks."""
    saved_world = (marker or {}).get("world_size", world)
    if saved_world == world:
        return ds_cfg, gas, micro * gas * world, ""
    saved = marker.get("meta", {}).get("batch")
    if not saved:
        raise ConfigError(f"--resume: the checkpoint was written by {saved_world} ranks and does not record its "
                          f"batch (an older dat-ds); resume it with {saved_world} ranks")
    old_global = saved["global"]
    if old_global % (micro * world) == 0:
        gas, how = old_global // (micro * world), "global batch kept"
    else:
        how = "global batch changed; the LR rule re-derives the peak LR"
    new_global = micro * gas * world
    cfg = {**ds_cfg, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "train_batch_size": new_global}
    return cfg, gas, new_global, (f"resumed a {saved_world}-rank checkpoint on {world} ranks: global batch "
                                  f"{old_global} -> {new_global} (micro {micro} x accumulation {gas} x {world} "
                                  f"ranks; {how})")


def place_in_pass(begin: EpochState, plan: PassPlan, samples_per_minibatch: int) -> EpochState:
    """A pass resumed from another world's checkpoint, in this world's minibatches: ``done`` and
    ``drawn`` set so that the pass trains exactly the minibatches its remaining samples make."""
    if not begin.regrouped:
        return begin
    limit = plan.batches[begin.epoch] if begin.epoch < plan.passes else 0
    step = plan.gas // math.gcd(plan.replays, plan.gas)
    remaining = max(0, limit * samples_per_minibatch - begin.consumed_base) // samples_per_minibatch // step * step
    done = limit - remaining
    return EpochState(begin.epoch, done, done, consumed_base=begin.consumed_base, done_base=done, regrouped=True)


def remap_schedule(engine, old_global: int, new_global: int) -> None:
    """The LR schedule's position in this world's steps: samples trained / the new global batch."""
    if old_global == new_global:
        return
    sched = engine.lr_scheduler
    samples = getattr(engine, "global_samples", engine.global_steps * old_global)
    sched.last_epoch = samples // new_global
    lrs = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    if dist.is_main():
        print(f"LR schedule resumed at step {sched.last_epoch} of this world ({samples} samples trained); "
              f"peak lr scale {sched.lr_plan.lr_scale:.4g}, lr now {lrs[0]:.4g}", flush=True)
