"""Gradient communication: the one place where ranks exchange gradients.

DeepSpeed's own backward all-reduce is switched off (``engine.enable_backward_allreduce =
False``); after ``engine.backward`` a compressor averages the gradients in place, and every
compressor counts the bytes it sends. ``none`` is the fp32 all-reduce every compressor is
measured against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as tdist

from .registry import Registry

COMPRESSORS = Registry("compressor")


@dataclass
class CommStats:
    """What one gradient exchange cost this rank."""
    bytes_sent: int = 0


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the pieces of ``flat`` back into ``tensors`` (same order and sizes)."""
    views = torch.split(flat, [t.numel() for t in tensors])
    torch._foreach_copy_(list(tensors), [v.view_as(t) for v, t in zip(views, tensors)])


class Compressor:
    """Base: ``encode``/``decode`` one tensor, and ``all_reduce_`` a list of gradients in place."""

    name = "base"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@COMPRESSORS.register("none")
class NoCompression(Compressor):
    """fp32 ring all-reduce of all gradients in one flat buffer: the reference."""

    name = "none"

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float().reshape(-1)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        return payload

    def all_reduce_(self, grads: List[torch.Tensor]) -> CommStats:
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        if world == 1 or not grads:
            return CommStats(0)
        flat = flatten(grads)
        tdist.all_reduce(flat)
        flat.div_(world)
        unflatten_into(flat, grads)
        # A ring all-reduce sends 2 (N - 1) / N of the buffer from every rank.
        return CommStats(int(2 * (world - 1) * flat.numel() * flat.element_size() / world))


def create(name: str, **kwargs) -> Compressor:
    """Build a registered compressor, e.g. ``create("none")``."""
    return COMPRESSORS.create(name, **kwargs)


def names():
    return COMPRESSORS.names()
