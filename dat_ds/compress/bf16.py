"""``bf16``: what DDP's ``bf16_compress_hook`` does, for the engine's gradient exchange."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as tdist

from .base import COMPRESSORS, Compressor, Payload
from .byzantine import _check_byzantine, corrupt_
from .collectives import CommStats, _timed, _world
from .workspace import Workspace


@COMPRESSORS.register("bf16")
class BF16Compression(Compressor):
    """Cast to bfloat16, divide by the world size, all-reduce (sum) in bf16, cast back to fp32:
    ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook``'s math.
    Half the bytes of ``none``; the sum is rounded to bf16 (8 bits of mantissa) at every step of
    the ring. World size 1 applies the same casts and sends nothing.

    Settings:
        byzantine_ranks: ranks that send a corrupted gradient (experiments only).
        byzantine_mode: how they corrupt it: ``flip``, ``random`` or ``scale``.
    """

    name = "bf16"

    def __init__(self, byzantine_ranks: Sequence[int] = (), byzantine_mode: str = "scale",
                 generator: Optional[torch.Generator] = None):
        self.byzantine_ranks, self.byzantine_mode = _check_byzantine(byzantine_ranks, byzantine_mode)
        self.generator = generator
        self._ws = Workspace()

    def encode(self, tensor: torch.Tensor) -> Payload:
        data = tensor.detach().to(torch.bfloat16).reshape(-1).view(torch.uint8).clone()
        return Payload(data, tensor.shape, tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.data.view(torch.bfloat16).to(payload.dtype).view(payload.shape)

    def all_reduce_flat_(self, flat: torch.Tensor, n: int, shapes=None) -> CommStats:
        world, rank = _world()
        stats = CommStats()
        if n == 0:
            return stats
        flat = flat[:n]
        if rank in self.byzantine_ranks:
            corrupt_(flat, self.byzantine_mode, self.generator)
        half = self._ws.get("bf16", (n,), torch.bfloat16, flat.device)
        half.copy_(flat).div_(world)
        if world > 1:
            _timed(stats, flat.device, tdist.all_reduce, half)
            # a ring all-reduce sends 2 (N - 1) / N of the buffer from every rank
            stats.bytes_sent = int(2 * (world - 1) * n * half.element_size() / world)
        flat.copy_(half)
        return stats
