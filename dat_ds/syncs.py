"""Count the calls that stall a GPU: device synchronizes and host reads of tensors.

On the CPU a synchronize costs nothing, so timing cannot show one; counting can. The counter
patches, while active, DeepSpeed's accelerator ``synchronize``, ``torch.cuda.synchronize``,
dat-ds's own ``dist.synchronize`` (all counted as ``"sync"``) and the host reads of a tensor
(``item``, ``tolist``, ``cpu``, ``float()``, ``int()``, ``bool()``: ``"host_read"``).

    >>> with SyncCounter() as counter:
    ...     torch.ones(2).sum().item()
    >>> counter.counts["host_read"]
    1
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import List, Optional

import torch

from . import dist

HOST_READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")


class SyncCounter:
    """Counts device synchronizes and host reads while active."""

    def __init__(self):
        self.counts = Counter()
        self._stack = contextlib.ExitStack()

    def _wrap(self, owner, name, label):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.counts[label] += 1
            return original(*args, **kwargs)
        self._stack.enter_context(_patched(owner, name, counted))

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator
        self._wrap(get_accelerator(), "synchronize", "sync")
        self._wrap(torch.cuda, "synchronize", "sync")
        self._wrap(dist, "synchronize", "sync")
        for name in HOST_READS:
            self._wrap(torch.Tensor, name, "host_read")
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def reset(self):
        self.counts.clear()


@contextlib.contextmanager
def _patched(owner, name, value):
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


class HostCopy:
    """A device tensor's values on the host without a stall: ``put`` queues a copy into pinned
    memory behind an event, ``get`` returns the values of the last ``put`` once that event has
    passed (long passed when read a step later). On the CPU the copy is immediate."""

    def __init__(self):
        self._host: Optional[torch.Tensor] = None
        self._event = None
        self.pending = False

    def put(self, value: torch.Tensor) -> None:
        value = value.detach().reshape(-1)
        if self._host is None or self._host.shape != value.shape or self._host.dtype != value.dtype:
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
        self._host.copy_(value, non_blocking=True)
        self._event = None
        if value.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self.pending = True

    def get(self) -> List[float]:
        if self._event is not None:
            self._event.synchronize()
        self.pending = False
        return [float(v) for v in self._host.numpy()]
