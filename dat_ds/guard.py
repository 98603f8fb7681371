"""Per-step safety: non-finite steps are skipped on every rank, and a stop signal is honoured at
the next step boundary.

Both ride on one tiny all-reduce per optimizer step (two floats: "this rank saw a non-finite
loss or gradient", "this rank was asked to stop"), so every rank takes the same decision:
gradients are averaged, so one rank's NaN would poison all of them, and a checkpoint needs every
rank. Checking a step costs one fused norm over the local gradients and that all-reduce.

Two ways to act on the agreement:

* **synchronous** (``agree``): the host reads the flags and skips the step there (no exchange, no
  update). One host read per optimizer step: it drains a GPU's queue, so the optimizer step's
  launches are no longer hidden behind the backward (measured on an H200: 7 to 19 % of the step time).
* **deferred** (``agree_deferred``): the decision stays on the device. The step runs with a gate
  (dat-ds's ``Lamb`` leaves weights and moments as they were when it is 0, the EMA too, BatchNorm
  statistics are restored by a ``where``, the gradients are zeroed), the flags travel to pinned
  host memory behind an event, and the host reads them one step later, when they are long there
  (``settle``): it then counts the skipped step, takes the LR schedule, LAMB's step count and the
  EMA's count back by one, and honours a stop request. No host read of the current step.

``StepGuard(defer="auto")`` takes the deferred path on CUDA when every part of the step can take
a device-side skip (:meth:`StepGuard.why_not_deferred`), the synchronous one otherwise;
``defer="on"`` takes it on the CPU too (same arithmetic), ``"off"`` never.
"""
from __future__ import annotations

import signal
from typing import List, Optional

import torch
import torch.distributed as tdist
from torch.optim.lr_scheduler import LambdaLR

from . import dist
from .syncs import HostCopy

DEFER_MODES = ("auto", "on", "off")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class StopRequested(Exception):
    """A SIGTERM/SIGINT stopped the run after a checkpoint; ``--resume`` continues."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """SIGTERM and SIGINT set a flag that the training loop acts on at the next step boundary.

    A second SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once. Further SIGTERMs are
    ignored: launchers and schedulers pass one on to ranks that already got it from the process
    group, and the graceful stop must survive that.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._interrupts = 0
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT and self._interrupts:
            raise KeyboardInterrupt
        self._interrupts += signum == signal.SIGINT
        self.signum = self.signum or signum


class StepGuard:
    """Decides, identically on every rank, whether a step is applied and whether to stop.

    ``check_values=False`` leaves overflow handling to DeepSpeed (its fp16 loss scaler skips
    overflowing steps itself); skipped steps are counted either way through
    ``engine.skipped_steps``. ``max_nonfinite`` consecutive skipped steps (0: no limit) raise
    :class:`NonFiniteError`.
    """

    def __init__(self, engine, max_nonfinite: int = 10, stop: Optional[StopSignal] = None,
                 check_values: Optional[bool] = None, defer: str = "auto"):
        if defer not in DEFER_MODES:
            raise ValueError(f"StepGuard defer must be one of {', '.join(DEFER_MODES)}, got {defer!r}")
        self.engine, self.max_nonfinite, self.stop, self.defer = engine, max_nonfinite, stop, defer
        self.check_values = not engine.fp16_enabled() if check_values is None else check_values
        self.consecutive = 0
        self.stop_requested = False
        self.stop_signum: Optional[int] = None
        self._buffers = [b for b in engine.module.buffers()]
        self._backup: Optional[List[torch.Tensor]] = None
        self._groups: Optional[list] = None  # _restore_where's views of buffers and backup
        self._window_open = False
        self.deferred = False  # chosen per epoch by prepare()
        self._ema = None
        self._flags = HostCopy()  # the last deferred agreement, on its way to the host
        self._flags_where = ""  # where that step was (epoch, batch), for the message of a stop

    # -- the deferred agreement ---------------------------------------------------------------
    def why_not_deferred(self, compressor, shape) -> Optional[str]:
        """Why this step cannot take a device-side skip (None: it can)."""
        from .optim import Lamb
        opt, sched = self.engine.optimizer, self.engine.lr_scheduler
        if not self.check_values:
            return "the non-finite check is DeepSpeed's (fp16 loss scaling)"
        if not isinstance(opt, Lamb):
            return f"the optimizer is {type(opt).__name__}, not dat-ds's Lamb (the one with a device-side gate)"
        if sched is not None and not isinstance(sched, LambdaLR):
            return f"the LR scheduler {type(sched).__name__} cannot be taken back one step"
        if getattr(compressor, "state_names", ()):
            return f"the compressor {compressor.name} keeps state that a discarded exchange would change"
        if not getattr(shape, "device_skip", False):
            return f"the {type(shape).__name__} step shape acts on the host's skip decision"
        if any(not b.is_contiguous() for b in self._buffers):
            return "a module buffer is not contiguous"
        return None

    def prepare(self, compressor, shape, ema=None) -> bool:
        """Pick the agreement for the coming steps (an epoch's start); True: deferred."""
        self.settle()
        wanted = self.defer == "on" or (self.defer == "auto" and self.engine.device.type == "cuda")
        self.deferred = wanted and self.why_not_deferred(compressor, shape) is None
        self._ema = ema if self.deferred else None
        return self.deferred

    def agree_deferred(self, loss: torch.Tensor, grads: List[torch.Tensor], where: str = "") -> torch.Tensor:
        """The agreement of this step as a 0-dim bool on the device (True: skip), with no host read
        of it: the flags reach the host behind an event and :meth:`settle` reads them one step later.
        Restores the BatchNorm statistics on the device when the step is skipped."""
        self._window_open = False
        self.settle()  # the previous step's flags: on the host by now
        flags = self._agreed_flags(loss, grads)
        skip = flags[0] > 0
        if self._backup is not None:
            self._restore_where(skip)
        self._flags.put(flags)
        self._flags_where = where
        return skip

    def settle(self) -> None:
        """Act on the last deferred agreement (a no-op when none is pending): count a skipped step
        and take back what the gated step advanced on the host; honour a stop request."""
        if not self._flags.pending:
            return
        skip, stop = (v > 0 for v in self._flags.get())  # long there: queued before the step it guarded
        if stop:
            self._request_stop()
        if skip:
            self._take_back()
        self._count(skip, self._flags_where)

    def _take_back(self) -> None:
        """A gated step left the weights alone; undo what it counted on the host."""
        engine = self.engine
        engine.skipped_steps += 1
        engine.optimizer.unstep()
        sched = engine.lr_scheduler
        if sched is not None:
            sched.last_epoch -= 1
            lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs
        if self._ema is not None:
            self._ema.unstep()

    def _restore_where(self, skip: torch.Tensor) -> None:
        """Buffers back to the copy taken before the forward where ``skip`` (a device bool) holds:
        per dtype, one gather, one where and one scatter back, whatever the number of buffers."""
        if self._groups is None:  # flat views of the buffers and their copies, grouped by dtype, once
            groups = {}
            for b, saved in zip(self._buffers, self._backup):
                live_views, saved_views = groups.setdefault(b.dtype, ([], []))
                live_views.append(b.data.view(-1))
                saved_views.append(saved.view(-1))
            self._groups = [(live, saved, [t.numel() for t in live]) for live, saved in groups.values()]
        for live, saved, sizes in self._groups:
            kept = torch.where(skip, torch.cat(saved), torch.cat(live))
            torch._foreach_copy_(live, list(kept.split(sizes)))

    @staticmethod
    def zero_grads_where(skip: torch.Tensor, engine) -> None:
        """Gradients of a skipped step become zeros (a gated step must see finite values); call
        after the exchange, which makes every ``.grad`` a view of the flat buffer where there is
        one: then one kernel, else one per tensor."""
        from .compress.flat import ATTR
        flat = getattr(engine, ATTR, None)
        if flat is not None:
            flat.buffer.masked_fill_(skip, 0.0)
            return
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.masked_fill_(skip, 0.0)

    def begin_micro_step(self) -> None:
        """Keep a copy of the buffers (BatchNorm statistics) the forward is about to update, so a
        skipped step leaves them as they were. Called before the first forward of each step."""
        if self._window_open or not self._buffers or not self.check_values:
            return
        if self._backup is None:
            self._backup = [b.detach().clone() for b in self._buffers]
        else:
            torch._foreach_copy_(self._backup, [b.detach() for b in self._buffers])
        self._window_open = True

    def _agreed_flags(self, loss: torch.Tensor, grads: List[torch.Tensor]) -> torch.Tensor:
        """[any rank saw a non-finite loss or gradient, any rank was asked to stop] on the device,
        after the one all-reduce (no host read, no host-to-device copy)."""
        if self.check_values and grads:
            total = torch.stack(torch._foreach_norm(grads)).sum() + loss.detach().float()
            bad = (~torch.isfinite(total)).float()
        elif self.check_values:
            bad = (~torch.isfinite(loss.detach().float())).float()
        else:
            bad = torch.zeros((), device=loss.device)
        flags = torch.stack([bad.reshape(()), bad.reshape(()) * 0 + self._local_stop()])
        if dist.world_size() > 1:
            tdist.all_reduce(flags)
        return flags

    def _local_stop(self) -> float:
        return float(self.stop is not None and self.stop.signum is not None)

    def _request_stop(self) -> None:
        """Some rank was asked to stop: finish this step, checkpoint, exit with its signal."""
        if not self.stop_requested:
            self.stop_requested = True
            self.stop_signum = self.stop.signum if self.stop is not None and self.stop.signum else signal.SIGTERM

    def agree(self, loss: torch.Tensor, grads: List[torch.Tensor]) -> bool:
        """One all-reduce: returns True when the step must be skipped (on every rank)."""
        self._window_open = False
        skip, stop = (v > 0 for v in self._agreed_flags(loss, grads).tolist())
        if stop:
            self._request_stop()
        if skip and self._backup is not None:
            torch._foreach_copy_([b.data for b in self._buffers], self._backup)
        return skip

    def stop_agreed(self) -> bool:
        """Outside the step loop (an epoch's end): has any rank been asked to stop? One all-reduce."""
        if dist.all_reduce_sum([self._local_stop()])[0] > 0:
            self._request_stop()
        return self.stop_requested

    def stepped(self, skipped_before: int, where: str) -> bool:
        """After ``engine.step()``: count consecutive skipped steps; True when this one was skipped."""
        skipped = self.engine.skipped_steps > skipped_before
        self._count(skipped, where)
        return skipped

    def _count(self, skipped: bool, where: str) -> None:
        """Consecutive skipped steps; ``max_nonfinite`` of them in a row end the run."""
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.max_nonfinite and self.consecutive >= self.max_nonfinite:
            raise NonFiniteError(f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                                 f"(last at {where}); stopping (check the data and the learning rate, or raise "
                                 f"--max-nonfinite)")


def skip_step(engine) -> None:
    """``engine.step()`` that applies no update, the way DeepSpeed handles an fp16 overflow: the
    gradients are cleared, ``engine.skipped_steps`` counts it and the LR schedule holds."""
    opt = engine.optimizer
    had_overflow = "overflow" in vars(opt)
    previous = vars(opt).get("overflow")
    opt.step = _no_update
    opt.overflow = True
    try:
        engine.step()
    finally:
        del opt.step
        if had_overflow:
            opt.overflow = previous
        else:
            del opt.overflow


def _no_update(*args, **kwargs):
    return None
