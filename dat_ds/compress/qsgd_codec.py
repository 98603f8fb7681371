"""The QSGD codec: one fp32 norm per bucket, then ``bits`` per value, stochastically rounded.

Bucket v, t_i = a v_i / ||v|| + c, code_i = floor(t_i + u_i) with u_i ~ U[0, 1), decoded as
(code_i - c) ||v|| / a. E[code_i] = t_i, so decoding is unbiased. For b >= 2, a = c = s =
2^(b-1) - 1: code - s is the signed level, sign(v_i) * l or sign(v_i) * (l + 1) with
l = floor(s |v_i| / ||v||), exactly QSGD's rounding, stored offset by s in b bits. For b = 1,
a = c = 1/2: the 1-bit stochastic sign, +-||v|| with P(+) = (1 + v_i / ||v||) / 2. t is
rounded down to a multiple of 2^-16 and u takes 2^16 values (16 random bits per value, 4 per
64-bit draw of the generator), so the bias is under 2^-16 of one level, the size of float32's
own rounding of t. 16-bit codes (an int16 signed level per value) run the baseline kernels
(``baseline.py``).

A bucket whose norm is below ``MIN_NORM`` (but not 0) is encoded with the norm ``MIN_NORM``,
which keeps the fixed-point scale finite and the code unbiased for the norm it stores.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import baseline, kernels
from .bits import header_floats, pack_bits, unpack_bits, unpack_to_float
from .qsgd_layout import _qsgd_levels, qsgd_bytes  # noqa: F401  (the payload's layout)
from .workspace import Workspace, _empty

MIN_NORM = 1e-30


def random16(shape, generator: Optional[torch.Generator], device, ws: Optional[Workspace]) -> torch.Tensor:
    """Uniform int16 values (16 random bits each) of ``shape``, 4 per 64-bit draw."""
    numel = math.prod(shape)
    words = _empty(ws, "rand.words", ((numel + 3) // 4,), torch.int64, device)
    words.random_(-2 ** 63, None, generator=generator)
    return words.view(torch.int16)[:numel].view(shape)


def _encode_eager(out, x, scale, noise, *, bits, a, c, ws=None):
    """``kernels.qsgd_encode_kernel`` as in-place passes over scratch buffers (same bytes)."""
    rows = x.shape[0]
    bound = a * 65536.0
    y = torch.mul(x, scale, out=_empty(ws, "qsgd.y", x.shape, torch.float32, x.device))
    y.clamp_(-bound, bound).floor_()
    codes = _empty(ws, "qsgd.q", x.shape, torch.int32, x.device).copy_(y)
    codes.add_(noise).add_(int(c * 65536) + 32768).bitwise_right_shift_(16)
    if bits == 8:
        out.view(rows, -1).copy_(codes.view(rows, -1))
        return
    small = _empty(ws, "qsgd.codes", (rows, codes[0].numel()), torch.uint8, x.device).copy_(codes.view(rows, -1))
    pack_bits(small, bits, out=out.view(rows, -1), ws=ws)


def _decode_eager(out, data, step, *, bits, c, bucket, mean, accumulate, ws=None):
    """``kernels.qsgd_decode_kernel`` row by row: unpack (table lookup for 1 and 2 bits), scale, add."""
    rows, size = data.shape[0], data.shape[1] * 8
    nb = size // bucket
    packed = data.view(rows, -1)
    for r in range(rows) if mean else [None]:
        part = packed if r is None else packed[r:r + 1]
        n = part.shape[0]
        level = _empty(ws, "qsgd.level", (n, size), torch.float32, data.device)
        if bits <= 2:
            unpack_to_float(part, bits, -c, 1.0, level, ws)
        else:
            codes = part if bits == 8 else unpack_bits(part, bits, size, ws=ws, out=_empty(
                ws, "qsgd.dcodes", (n, size), torch.uint8, data.device))
            level.copy_(codes).sub_(c)
        s = step if r is None else step[r:r + 1]
        target = out.view(1 if mean else n, nb, bucket)
        if accumulate or (mean and r > 0):
            target.addcmul_(level.view(n, nb, bucket), s)
        else:
            torch.mul(level.view(n, nb, bucket), s, out=target)


def qsgd_encode(x: torch.Tensor, bits: int, bucket_size: int, generator: Optional[torch.Generator] = None,
                out: Optional[torch.Tensor] = None, ws=None) -> torch.Tensor:
    """Rows of fp32 values (R, S), S a multiple of ``bucket_size`` (itself a multiple of 8),
    -> payload rows (R, 4 S / bucket_size + S bits / 8): fp32 norms, then packed codes."""
    if bits == 16:
        return baseline.qsgd_encode(x, bits, bucket_size, generator, out, ws)
    rows, size = x.shape
    nb = size // bucket_size
    header = 4 * nb
    a, c, _ = _qsgd_levels(bits)
    if out is None:
        out = torch.empty(rows, qsgd_bytes(size, bits, bucket_size), dtype=torch.uint8, device=x.device)
    v = x.view(rows, nb, bucket_size)
    norms = torch.linalg.vector_norm(v, dim=2, keepdim=True)
    norms = torch.where(norms > 0, norms.clamp_min(MIN_NORM), norms)
    out[:, :header].copy_(norms.view(rows, nb).view(torch.uint8))
    scale = torch.where(norms > 0, (a * 65536.0) / norms, torch.zeros_like(norms))
    noise = random16(v.shape, generator, x.device, ws)
    kernels.run(kernels.qsgd_encode_kernel, functools.partial(_encode_eager, ws=ws), x.numel(),
                out[:, header:].view(rows, size // 8, bits), v, scale, noise, bits=bits, a=a, c=c)
    return out


def qsgd_decode(data: torch.Tensor, bits: int, bucket_size: int, size: int, out: Optional[torch.Tensor] = None,
                ws=None, weight: float = 1.0, accumulate: bool = False, mean: bool = False) -> torch.Tensor:
    """Payload rows from ``qsgd_encode`` -> fp32 rows (R, size), times ``weight``; with ``mean``
    the rows' sum (size,) in one pass (``weight`` 1 / R makes it their mean); with
    ``accumulate`` the result is added to ``out`` instead of written."""
    if bits == 16:
        assert not mean, "16-bit codes decode row by row"
        return baseline.qsgd_decode(data, bits, bucket_size, size, out, ws, weight, accumulate)
    rows = data.shape[0]
    nb = size // bucket_size
    header = 4 * nb
    a, c, _ = _qsgd_levels(bits)
    if out is None:
        out = torch.zeros((size,) if mean else (rows, size), dtype=torch.float32, device=data.device)
    step = header_floats(data, header).view(rows, nb, 1) * (weight / a)
    target = out.view(nb, bucket_size) if mean else out.view(rows, nb, bucket_size)
    kernels.run(kernels.qsgd_decode_kernel, functools.partial(_decode_eager, ws=ws), rows * size, target,
                data[:, header:].view(rows, size // 8, bits), step,
                bits=bits, c=c, bucket=bucket_size, mean=mean, accumulate=accumulate)
    return out
