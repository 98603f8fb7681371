"""Collectives of the compressed exchange: timing, byte accounting, world size."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Tuple

import torch
import torch.distributed as tdist

from ..timing import event_pair_start

TOPOLOGIES = ("one-sided", "two-sided")


@dataclass
class CommStats:
    """What one gradient exchange cost this rank: bytes, and the time inside collectives as wall
    seconds (CPU) or CUDA event pairs read later (GPU: timing never synchronizes the device)."""
    bytes_sent: int = 0
    comm_seconds: float = 0.0
    comm_events: list = field(default_factory=list)


def _world() -> Tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size(), tdist.get_rank()
    return 1, 0


def _timed(stats: CommStats, device: torch.device, fn: Callable, *args) -> None:
    """Run one collective and time it: wall time on the CPU; on a GPU a pair of CUDA events on
    the current stream, so no synchronize stalls the step (:mod:`dat_ds.timing` reads them)."""
    if device.type == "cuda":
        start = event_pair_start(device)
        fn(*args)
        stats.comm_events.append((start, event_pair_start(device)))
        return
    t0 = time.perf_counter()
    fn(*args)
    stats.comm_seconds += time.perf_counter() - t0


def _all_gather(stats: CommStats, out: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """(1, P) from every rank -> (N, P) in rank order; world size 1 copies."""
    if out.shape[0] == 1:
        return out.copy_(row)
    _timed(stats, row.device, tdist.all_gather_into_tensor, out, row)
    stats.bytes_sent += (out.shape[0] - 1) * row.numel() * row.element_size()
    return out


def _all_to_all(stats: CommStats, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row k of every rank's (N, P) goes to rank k; out row j is what rank j sent."""
    if out.shape[0] == 1:
        return out.copy_(rows)
    _timed(stats, rows.device, tdist.all_to_all_single, out, rows)
    stats.bytes_sent += (out.shape[0] - 1) * rows[0].numel() * rows.element_size()
    return out


