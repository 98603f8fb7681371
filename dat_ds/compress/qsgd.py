"""``qsgd``: QSGD (Alistarh et al. 2017), stochastic rounding to ``bits`` per value."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import baseline
from .base import COMPRESSORS, _Compressed
from .qsgd_codec import qsgd_bytes, qsgd_decode, qsgd_encode
from .settings import _check_int


@COMPRESSORS.register("qsgd")
class QSGD(_Compressed):
    """QSGD (Alistarh 2017): ``bits`` per value (1..8 or 16), one fp32 norm per ``bucket_size`` values.

    Two-sided, the server re-quantizes the averaged shard with the same settings. Randomness
    comes from ``generator`` (a seed per exchange; its state is checkpointed), else the global RNG.

    Settings:
        bits: bits per value, 1 to 8, or 16.
        bucket_size: values per fp32 norm, a positive multiple of 8.
        topology: ``one-sided`` (all_gather) or ``two-sided`` (parameter server shards).
        byzantine_ranks, byzantine_mode: corrupted ranks (experiments only).
    """

    name = "qsgd"

    def __init__(self, bits: int = 8, bucket_size: int = 512, topology: str = "one-sided",
                 byzantine_ranks: Sequence[int] = (), byzantine_mode: str = "scale",
                 generator: Optional[torch.Generator] = None):
        super().__init__(topology, byzantine_ranks, byzantine_mode, generator)
        if not (type(bits) is int and bits == 16):
            try:
                _check_int("bits", bits, 1, 8)
            except ValueError:
                raise ValueError(f"bits={bits!r} is not allowed; bits must be an integer from 1 to 8, or 16") from None
        self.bits = self._bits = bits
        self.bucket_size = self.unit = _check_int("bucket_size", bucket_size, 8, multiple=8)

    def _header(self, size: int) -> int:
        return 4 * (size // self.bucket_size)

    def _encode(self, x, ws, tag):
        out = None if ws is None else ws.get(tag, (x.shape[0], qsgd_bytes(x.shape[1], self.bits, self.bucket_size)),
                                             torch.uint8, x.device)
        encode = baseline.qsgd_encode if self.baseline else qsgd_encode
        return encode(x, self.bits, self.bucket_size, self.generator, out=out, ws=ws)

    def _decode(self, data, size, ws, out=None, weight=1.0, accumulate=False, mean=False):
        if self.baseline or (mean and self.bits == 16):
            if mean:   # row by row into the sum
                for r in range(data.shape[0]):
                    baseline.qsgd_decode(data[r:r + 1], self.bits, self.bucket_size, size, out.view(1, size), ws,
                                         weight, accumulate or r > 0)
                return out
            return baseline.qsgd_decode(data, self.bits, self.bucket_size, size, out, ws, weight, accumulate)
        return qsgd_decode(data, self.bits, self.bucket_size, size, out, ws, weight, accumulate, mean)

    def _worker(self, x, valid, ws, tag):
        return self._encode(x, ws, tag)

    _reduce = _Compressed._mean

    def _serve(self, agg, valid, world):
        return self._encode(agg, self._ws, "served")

