"""Progress of long evaluations as plain lines, readable in a log file as on a terminal.

A progress bar redraws one line with carriage returns: in a file it is noise or nothing at all.
:class:`EvalProgress` writes whole lines on rank 0 instead, at a bounded rate:

    evaluating: 40 batches of rank 0 (80 in all, 2 ranks) x 15 evaluations: pgd10x1_linf_eps0.1, ...
    evaluating: pgd10x1_linf_eps0.1 batch 1/40, 0.4 s
    evaluating: pgd10x1_linf_eps0.1 batch 1/40 done in 3.1 s
    ...
    evaluating: autoattack_linf_eps0.1 batch 7/40, 312.4 s, about 1470 s left
    evaluating: done, 40 batches in 1790.2 s

Every evaluation's start and end on the first batch (what each one costs), then a start at most
every ``every`` seconds, and the end of any evaluation that took ``every`` seconds or more.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Optional, Sequence, TextIO

from . import dist


class EvalProgress:
    """Plain progress lines of a batched evaluation (``dat_ds.evaluate.sample_table``'s ``progress=``).

    >>> import io
    >>> out = io.StringIO()
    >>> p = EvalProgress(every=5.0, stream=out, clock=iter([0.0, 1.0, 2.0]).__next__, enabled=True)
    >>> p.begin(batches=1, total_batches=1, names=["pgd10"])
    >>> with p.step(0, "pgd10"):
    ...     pass
    >>> out.getvalue().splitlines()[1:]
    ['evaluating: pgd10 batch 1/1, 1.0 s', 'evaluating: pgd10 batch 1/1 done in 1.0 s']
    """

    def __init__(self, every: float = 5.0, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.perf_counter, enabled: Optional[bool] = None):
        if not every >= 0:
            raise ValueError(f"progress interval must be >= 0 seconds, got {every}")
        self.every, self.stream, self.clock = float(every), stream, clock
        self.enabled = dist.is_main() if enabled is None else enabled  # rank 0 speaks for all
        self.batches = self.done = 0
        self.t0 = self.last = 0.0

    def _say(self, text: str, now: float) -> None:
        print(f"evaluating: {text}", file=self.stream or sys.stderr, flush=True)
        self.last = now

    def begin(self, batches: int, total_batches: int, names: Sequence[str]) -> None:
        """Before the first batch: this rank's batches, all ranks' batches and the evaluations' names."""
        self.batches, self.done = batches, 0
        self.t0 = self.clock()
        if self.enabled:
            ranks = f" ({total_batches} in all, {dist.world_size()} ranks)" if total_batches != batches else ""
            self._say(f"{batches} batches of rank {dist.rank()}{ranks} x {len(names)} evaluations: "
                      f"{', '.join(names) or 'clean only'}", self.t0)

    @contextlib.contextmanager
    def step(self, batch: int, name: str):
        """One evaluation (``name``) on batch ``batch`` (0-based) of this rank."""
        if not self.enabled:
            yield
            return
        start = self.clock()
        if batch == 0 or start - self.last >= self.every:
            self._say(f"{name} batch {batch + 1}/{self.batches}, {start - self.t0:.1f} s{self._left(start)}", start)
        yield
        now = self.clock()
        if batch == 0 or now - start >= self.every:
            self._say(f"{name} batch {batch + 1}/{self.batches} done in {now - start:.1f} s", now)

    def batch_done(self) -> None:
        self.done += 1

    def _left(self, now: float) -> str:
        if not self.done:
            return ""
        return f", about {(now - self.t0) / self.done * (self.batches - self.done):.0f} s left"

    def end(self) -> None:
        if self.enabled:
            now = self.clock()
            self._say(f"done, {self.done} batches in {now - self.t0:.1f} s", now)
