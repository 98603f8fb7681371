"""Per-step safety: non-finite steps are skipped on every rank, and a stop signal is honoured at
the next step boundary.

Both ride on one tiny all-reduce per optimizer step (two floats: "this rank saw a non-finite
loss or gradient", "this rank was asked to stop"), so every rank takes the same decision:
gradients are averaged, so one rank's NaN would poison all of them, and a checkpoint needs every
rank. Checking a step costs one fused norm over the local gradients and that one host sync.
"""
from __future__ import annotations

import signal
from typing import List, Optional

import torch
import torch.distributed as tdist

from . import dist


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
                 check_values: Optional[bool] = None):
        self.engine, self.max_nonfinite, self.stop = engine, max_nonfinite, stop
        self.check_values = not engine.fp16_enabled() if check_values is None else check_values
        self.consecutive = 0
        self.stop_requested = False
        self.stop_signum: Optional[int] = None
        self._buffers = [b for b in engine.module.buffers()]
        self._backup: Optional[List[torch.Tensor]] = None
        self._window_open = False

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

    def agree(self, loss: torch.Tensor, grads: List[torch.Tensor]) -> bool:
        """One all-reduce: returns True when the step must be skipped (on every rank)."""
        self._window_open = False
        local_stop = float(self.stop is not None and self.stop.signum is not None)
        if self.check_values and grads:
            total = torch.stack(torch._foreach_norm(grads)).sum() + loss.detach().float()
            bad = (~torch.isfinite(total)).float()
        elif self.check_values:
            bad = (~torch.isfinite(loss.detach().float())).float()
        else:
            bad = torch.zeros((), device=loss.device)
        flags = torch.stack([bad.reshape(()), torch.tensor(local_stop, device=bad.device)])
        if dist.world_size() > 1:
            tdist.all_reduce(flags)
        skip, stop = (v > 0 for v in flags.tolist())
        if stop and not self.stop_requested:
            self.stop_requested = True
            self.stop_signum = (self.stop.signum if self.stop is not None and self.stop.signum else signal.SIGTERM)
        if skip and self._backup is not None:
            torch._foreach_copy_([b.data for b in self._buffers], self._backup)
        return skip

    def stop_agreed(self) -> bool:
        """Outside the step loop (an epoch's end): has any rank been asked to stop? One all-reduce."""
        local = float(self.stop is not None and self.stop.signum is not None)
        if dist.all_reduce_sum([local])[0] > 0 and not self.stop_requested:
            self.stop_requested = True
            self.stop_signum = self.stop.signum if self.stop is not None and self.stop.signum else signal.SIGTERM
        return self.stop_requested

    def stepped(self, skipped_before: int, where: str) -> bool:
        """After ``engine.step()``: count consecutive skipped steps; True when this one was skipped."""
        skipped = self.engine.skipped_steps > skipped_before
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.max_nonfinite and self.consecutive >= self.max_nonfinite:
            raise NonFiniteError(f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                                 f"(last at {where}); stopping (check the data and the learning rate, or raise "
                                 f"--max-nonfinite)")
        return skipped


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
