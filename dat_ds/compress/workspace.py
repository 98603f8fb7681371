"""Scratch memory the hot path reuses instead of allocating."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch


class Workspace:
    """Named scratch tensors reused across calls, on the CPU.

    There a fresh 45 MB tensor costs about as much in page faults as two passes of arithmetic
    over it, so the hot path writes into buffers it keeps (12 to 24 bytes per gradient value
    in all). Each name is one role; a buffer only grows. On accelerators the caching allocator
    already recycles memory, so tensors are allocated per call and the memory goes back to it.
    """

    def __init__(self):
        self._bufs: Dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        device = torch.device(device)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        key = (name, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def _empty(ws: Optional[Workspace], name: str, shape, dtype, device) -> torch.Tensor:
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.get(name, tuple(shape), dtype, device)

