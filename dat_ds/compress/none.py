"""``none``: the fp32 ring all-reduce every compressor is measured against."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as tdist

from .base import COMPRESSORS, Compressor
from .byzantine import _check_byzantine, corrupt_
from .collectives import CommStats, _timed, _world


@COMPRESSORS.register("none")
class NoCompression(Compressor):
    """fp32 ring all-reduce of all gradients in one flat buffer: the reference.

    Gradients of any dtype (bf16 under DeepSpeed's bf16 mode) are exchanged and averaged in
    fp32, then cast back.

    Settings:
        byzantine_ranks: ranks that send a corrupted gradient (experiments only).
        byzantine_mode: how they corrupt it: ``flip``, ``random`` or ``scale``.
    """

    name = "none"

    def __init__(self, byzantine_ranks: Sequence[int] = (), byzantine_mode: str = "scale",
                 generator: Optional[torch.Generator] = None):
        self.byzantine_ranks, self.byzantine_mode = _check_byzantine(byzantine_ranks, byzantine_mode)
        self.generator = generator

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float().reshape(-1)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        return payload

    def all_reduce_(self, grads):
        if _world()[0] == 1 or not grads:
            return CommStats(0)
        return super().all_reduce_(grads)

    def all_reduce_flat_(self, flat: torch.Tensor, n: int, shapes: Optional[Sequence[torch.Size]] = None) -> CommStats:
        world, rank = _world()
        if world == 1 or n == 0:
            return CommStats(0)
        flat = flat[:n]
        if rank in self.byzantine_ranks:
            corrupt_(flat, self.byzantine_mode, self.generator)
        stats = CommStats()
        _timed(stats, flat.device, tdist.all_reduce, flat)
        flat.div_(world)
        # A ring all-reduce sends 2 (N - 1) / N of the buffer from every rank.
        stats.bytes_sent = int(2 * (world - 1) * flat.numel() * flat.element_size() / world)
        return stats
