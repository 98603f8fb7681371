"""``sign_vote``: signSGD / Signum with majority vote (Bernstein et al. 2018)."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from . import baseline, kernels
from .base import COMPRESSORS, _Compressed
from .bits import pack_bits, unpack_bits
from .sign_codec import codes_decode, codes_encode, majority_vote, sign_bytes, sign_decode, sign_encode


@COMPRESSORS.register("sign_vote")
class SignVote(_Compressed):
    """signSGD (``momentum`` 0) / Signum with majority vote (Bernstein 2018).

    A worker sends sign(g), or sign(m) with m <- momentum m + (1 - momentum) g; the result is
    sign(sum of the N signs), +-1 per coordinate, 0 on a tie (even N only). Two-sided, the
    server returns its shard's vote in 1 bit (odd N) or 2 bits (even N: the tie needs a third
    value).

    Settings:
        momentum: Signum's momentum in [0, 1); 0 is signSGD.
        topology: ``one-sided`` (all_gather) or ``two-sided`` (parameter server shards).
        byzantine_ranks, byzantine_mode: corrupted ranks (experiments only).

    State: ``momentum`` (with momentum > 0).
    """

    name = "sign_vote"
    state_names = ("momentum",)
    _bits = 1

    def __init__(self, momentum: float = 0.0, topology: str = "one-sided", byzantine_ranks: Sequence[int] = (),
                 byzantine_mode: str = "flip", generator: Optional[torch.Generator] = None):
        super().__init__(topology, byzantine_ranks, byzantine_mode, generator)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum!r} is not allowed; momentum must be a number in [0, 1) "
                             f"(0 = signSGD)")
        self.momentum = float(momentum)

    def _header(self, size: int) -> int:
        return 0

    def _encode(self, x, ws, tag):
        out = None if ws is None else ws.get(tag, (x.shape[0], sign_bytes(x.shape[1])), torch.uint8, x.device)
        encode = baseline.sign_encode if self.baseline else sign_encode
        return encode(x, None, out=out, ws=ws)

    def _decode(self, data, size, ws, out=None, weight=1.0, accumulate=False, mean=False):
        if self.baseline:
            return baseline.sign_decode(data, size, None, out, ws, weight, accumulate)
        return sign_decode(data, size, None, out, ws, weight, accumulate, mean)

    def _worker(self, x, valid, ws, tag):
        if self.momentum:
            m = self._buffer("momentum", x.numel(), x).view_as(x)
            x = m.mul_(self.momentum).add_(x, alpha=1 - self.momentum)
        return self._encode(x, ws, tag)

    def _reduce(self, data: torch.Tensor, size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Majority vote of the N payload rows: sign(N / 2 - #negative)."""
        vote = self._ws.get("vote", (size,), torch.float32, data.device) if out is None else out.view(-1)
        if not self.baseline:
            return majority_vote(data, size, out=vote, ws=self._ws)
        world = data.shape[0]
        count = self._ws.get("count", (size,), torch.uint8 if world < 256 else torch.int32, data.device)
        for r in range(world):    # count the negative signs
            bits = baseline.sign_unpack(data[r:r + 1], size, None, self._ws).view(-1)
            count.copy_(bits) if r == 0 else count.add_(bits)
        return vote.copy_(count).sub_(world / 2).neg_().sign_()

    def _serve(self, agg, valid, world):
        if world % 2:
            return self._encode(agg, self._ws, "served")
        out = self._ws.get("served", (1, agg.shape[1] // 4), torch.uint8, agg.device)
        if not self.baseline:   # -1, 0, 1 -> codes 0, 1, 2
            kernels.run(kernels.codes_encode_kernel, functools.partial(codes_encode, ws=self._ws), agg.numel(),
                        out.view(1, -1, 2), agg.view(1, -1, 8), bits=2, offset=1)
            return out
        codes = self._ws.get("vote.codes", agg.shape, torch.uint8, agg.device)
        return pack_bits(codes.copy_(agg.add_(1)), 2, out=out, ws=self._ws)

    def _unserve(self, data, size, world, out=None):
        out = self._ws.get("result", (data.shape[0], size), torch.float32, data.device) if out is None else out
        if world % 2:
            return self._decode(data, size, self._ws, out)
        if not self.baseline:
            kernels.run(kernels.codes_decode_kernel, functools.partial(codes_decode, ws=self._ws),
                        data.shape[0] * size, out.view(data.shape[0], -1, 8), data.view(data.shape[0], -1, 2),
                        bits=2, offset=1)
            return out
        codes = unpack_bits(data, 2, size, out=self._ws.get("vote.dcodes", (data.shape[0], size), torch.uint8,
                                                            data.device), ws=self._ws)
        return out.copy_(codes).sub_(1)
