"""Byzantine ranks (experiments only): the corrupted gradient a listed rank sends."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .settings import _check_choice, _check_int

BYZANTINE_MODES = ("flip", "random", "scale")
BYZANTINE_SCALE = 100.0


def _check_byzantine(ranks, mode) -> Tuple[Tuple[int, ...], str]:
    try:
        ranks = tuple(ranks)
    except TypeError:
        raise ValueError(f"byzantine_ranks={ranks!r} is not allowed; give a tuple of rank numbers") from None
    for r in ranks:
        _check_int("byzantine_ranks entry", r, 0)
    return ranks, _check_choice("byzantine_mode", mode, BYZANTINE_MODES)


def corrupt_(flat: torch.Tensor, mode: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Byzantine rank's gradient, in place: ``flip`` -g, ``random`` noise of the same norm,
    ``scale`` -100 g."""
    if mode == "flip":
        return flat.neg_()
    if mode == "scale":
        return flat.mul_(-BYZANTINE_SCALE)
    rms = torch.linalg.vector_norm(flat) / math.sqrt(max(flat.numel(), 1))
    noise = torch.randn(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
    return flat.copy_(noise.mul_(rms))


