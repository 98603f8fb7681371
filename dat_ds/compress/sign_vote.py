"""``sign_vote``: signSGD / Signum with majority vote (Bernstein et al. 2018).

One bit cannot carry sign(0) = 0, and the float's sign bit would send an exact zero as +1: a
parameter whose gradient is 0 would get a +1 vote on every step and drift. A worker's exact
zero therefore votes +1 or -1 by a fair coin (one random bit per value, drawn from the
compressor's generator, else the device's global RNG): a vote of mean 0 like sign(0), so
zeros push no coordinate either way on average, and where every rank sends 0 the vote stays
unbiased. (A zero mask would keep the 0 exactly but cost a second bit per value.) Parameters
without any gradient do not take part at all: :mod:`.flat` gives them no ``.grad`` after the
exchange, so the optimizer leaves them alone.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from . import baseline, kernels
from .base import COMPRESSORS, _Compressed
from .bits import pack_bits, unpack_bits
from .sign_codec import _encode_eager, codes_decode, codes_encode, majority_vote, sign_bytes, sign_decode, sign_encode
from .workspace import _empty


def tie_sign_kernel(out: torch.Tensor, x: torch.Tensor, coin: torch.Tensor) -> None:
    """x (R, G, 8) -> out (R, G, 1) uint8: bit k of a byte is 1 where value k is negative, and
    where value k is exactly 0 it is bit k of ``coin`` (R, G, 1) instead (+1 or -1 at random)."""
    bits = torch.where(x == 0, kernels.unpack(coin, 1).view(x.shape), kernels.sign_bits(x))
    out.copy_(kernels.pack(bits, 1))


def _tie_sign_eager(out, x, coin, ws=None, sign=None):
    """``tie_sign_kernel`` eagerly (the same bytes): the sign bits (``sign``: the encoder that
    writes them), then the coin's bits swapped in where x is exactly 0."""
    rows = x.shape[0]
    (sign or _encode_eager)(out, x, ws)
    zero = _empty(ws, "tie.zero", (rows, x[0].numel()), torch.uint8, x.device)
    torch.eq(x.reshape(rows, -1), 0, out=zero.view(torch.bool))
    mask = pack_bits(zero, 1, out=_empty(ws, "tie.mask", (rows, coin[0].numel()), torch.uint8, x.device), ws=ws)
    out = out.view(rows, -1)
    flip = torch.bitwise_xor(out, coin.view(rows, -1), out=_empty(ws, "tie.flip", out.shape, torch.uint8, x.device))
    out.bitwise_xor_(flip.bitwise_and_(mask))


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
        return self._vote_bits(x, ws, tag)

    def _vote_bits(self, x: torch.Tensor, ws, tag: str) -> torch.Tensor:
        """This rank's vote on rows x (R, S): sign bits, an exact zero voting +1 or -1 by a coin."""
        rows, size = x.shape
        out = _empty(ws, tag, (rows, size // 8), torch.uint8, x.device)
        words = _empty(ws, "tie.words", (math.ceil(rows * size / 64),), torch.int64, x.device)
        words.random_(-2 ** 63, None, generator=self.generator)
        coin = words.view(torch.uint8)[:rows * size // 8].view(rows, size // 8, 1)
        if self.baseline:
            _tie_sign_eager(out, x, coin, ws, sign=lambda o, v, w: baseline.sign_encode(v, None, out=o, ws=w))
            return out
        kernels.run(tie_sign_kernel, functools.partial(_tie_sign_eager, ws=ws), x.numel(),
                    out.view(rows, size // 8, 1), x.view(rows, size // 8, 8), coin)
        return out

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
