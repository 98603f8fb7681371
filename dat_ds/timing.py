"""Phase timers that never stall the device.

On the CPU a phase is wall time, as measured. On a GPU a phase records a pair of CUDA events on
the current stream (no synchronize), and the elapsed times are read once, when the totals are
asked for (:meth:`Timers.reset`, at the end of a logging interval): one host sync per interval
instead of two per phase. Collectives time themselves the same way (``CommStats.comm_events``),
and :meth:`Timers.move` re-attributes their time from the phase that ran them.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

EventPair = Tuple["torch.cuda.Event", "torch.cuda.Event"]


def event_pair_start(device: Optional[torch.device] = None) -> "torch.cuda.Event":
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def elapsed(pairs: List[EventPair]) -> float:
    """Seconds between the events of each pair, summed (waits for the last of them)."""
    if not pairs:
        return 0.0
    pairs[-1][1].synchronize()
    return sum(start.elapsed_time(end) for start, end in pairs) / 1000.0


class Timers:
    """Seconds per phase: ``with timers("attack"): ...``; ``reset()`` returns and clears the totals.

    ``device``: where the timed work runs; CUDA devices are timed with events (see the module
    doc), everything else with ``time.perf_counter``.
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds: Dict[str, float] = defaultdict(float)
        self._events: Dict[str, List[EventPair]] = defaultdict(list)
        self._moved: Dict[str, List[EventPair]] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start = event_pair_start()
            try:
                yield
            finally:
                self._events[name].append((start, event_pair_start()))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float = 0.0, events: Optional[List[EventPair]] = None) -> None:
        """Time measured elsewhere: ``seconds`` of wall time, or CUDA ``events`` recorded on another
        stream (e.g. an attack running beside the update), read at :meth:`reset`."""
        self.seconds[name] += seconds
        if events:
            self._events[name].extend(events)

    def move(self, source: str, target: str, seconds: float = 0.0, events: Optional[List[EventPair]] = None) -> None:
        """Re-attribute time measured inside ``source`` to ``target``: ``seconds`` of wall time, or
        the time between CUDA ``events`` (read later)."""
        if events:
            self._moved[source].extend(events)
            self._events[target].extend(events)
        if seconds:
            self.seconds[source] -= seconds
            self.seconds[target] += seconds

    def reset(self) -> Dict[str, float]:
        """The totals since the last reset, in seconds (one device sync on a GPU), and a fresh start."""
        out = defaultdict(float, self.seconds)
        for name, pairs in self._events.items():
            out[name] += elapsed(pairs)
        for name, pairs in self._moved.items():
            out[name] -= elapsed(pairs)
        self.seconds = defaultdict(float)
        self._events, self._moved = defaultdict(list), defaultdict(list)
        return dict(out)
