"""The codecs' first vectorized, eager form: the baseline the fused kernels are measured against.

``bench/compress_bench.py`` runs every compressor on these (``Compressor.use_baseline_codec``)
and on the fused kernels side by side. 16-bit QSGD codes always run here (a signed int16 per
value needs no bit packing and is not a target of the fused path). The payload layout is the
same as the fused codecs'; the random numbers of QSGD's rounding are not, so the bytes differ.
"""
from __future__ import annotations

from typing import Optional

import torch

from .bits import header_floats, pack_bits, unpack_bits, unpack_to_float
from .qsgd_layout import _qsgd_levels, qsgd_bytes  # noqa: F401  (the fused codec's layout)
from .sign_codec import sign_bytes
from .workspace import Workspace, _empty

# Bucket v, t_i = a v_i / ||v|| + c, code_i = floor(t_i + u_i) with u_i ~ U[0, 1), decoded as
# (code_i - c) ||v|| / a. E[code_i] = t_i, so decoding is unbiased. For b >= 2, a = c = s =
# 2^(b-1) - 1: code - s is the signed level, sign(v_i) * l or sign(v_i) * (l + 1) with
# l = floor(s |v_i| / ||v||), exactly QSGD's rounding (stochastic rounding of the signed value
# picks the same two neighbours with the same probabilities), stored offset by s in b bits.
# For b = 1, a = c = 1/2: the 1-bit stochastic sign, +-||v|| with P(+) = (1 + v_i/||v||) / 2.
# The rounding draws 16 random bits per coordinate (u in steps of 2^-16, 4 values per 64-bit
# draw): its bias is under 2^-16 of one level, the size of float32's own rounding of t. At
# 16 bits t reaches 2^16 and float32 resolves t + u to 2^-7 of a level: a bias below 2^-22 of
# the bucket norm, under the float32 rounding of the decoded values themselves.

def _random16(numel: int, generator, device, ws: Optional[Workspace]) -> torch.Tensor:
    """``numel`` uniform int16 values (16 random bits each), 4 per 64-bit draw."""
    words = _empty(ws, "rand.words", ((numel + 3) // 4,), torch.int64, device)
    words.random_(-2 ** 63, None, generator=generator)
    return words.view(torch.int16)[:numel]


def qsgd_encode(x: torch.Tensor, bits: int, bucket_size: int, generator: Optional[torch.Generator] = None,
                out: Optional[torch.Tensor] = None, ws: Optional[Workspace] = None) -> torch.Tensor:
    """Rows of fp32 values (R, S), S a multiple of ``bucket_size`` (itself a multiple of 8),
    -> payload rows (R, 4 S / bucket_size + S bits / 8): fp32 norms, then packed codes."""
    rows, size = x.shape
    nb = size // bucket_size
    header = 4 * nb
    a, c, top = _qsgd_levels(bits)
    if out is None:
        out = torch.empty(rows, qsgd_bytes(size, bits, bucket_size), dtype=torch.uint8, device=x.device)
    v = x.view(rows, nb, bucket_size)
    norms = torch.linalg.vector_norm(v, dim=2, keepdim=True)
    out[:, :header].copy_(norms.view(rows, nb).view(torch.uint8))
    # fixed point in units of 2^-16: y = 65536 (t + u), then code = trunc(y / 65536)
    y = _empty(ws, "qsgd.y", v.shape, torch.float32, x.device)
    y.copy_(_random16(y.numel(), generator, x.device, ws).view_as(y))     # r in [-32768, 32768)
    torch.addcmul(y, v, (a * 65536.0) / norms.clamp_min(torch.finfo(torch.float32).tiny), out=y)
    y.add_(c * 65536.0 + 32768.0).mul_(1.0 / 65536.0)                   # t + (r + 32768) / 65536
    if bits == 16:                    # int16 signed level code - c, little endian
        codes = _empty(ws, "qsgd.codes16", v.shape, torch.int32, x.device)
        codes.copy_(y).clamp_max_(top).sub_(int(c))
        out[:, header:].view(torch.int16).view(rows, nb, bucket_size).copy_(codes)
        return out
    direct = bits == 8
    codes = out[:, header:].view(rows, nb, bucket_size) if direct else \
        _empty(ws, "qsgd.codes", v.shape, torch.uint8, x.device)
    codes.copy_(y).clamp_max_(top)    # y >= 0 up to rounding: truncation is floor
    if not direct:
        pack_bits(codes.view(rows, size), bits, out=out[:, header:], ws=ws)
    return out


def qsgd_decode(data: torch.Tensor, bits: int, bucket_size: int, size: int, out: Optional[torch.Tensor] = None,
                ws: Optional[Workspace] = None, weight: float = 1.0, accumulate: bool = False) -> torch.Tensor:
    """Payload rows from ``qsgd_encode`` -> fp32 rows (R, size), times ``weight``; with
    ``accumulate`` the decoded rows are added to ``out`` instead of written."""
    rows = data.shape[0]
    nb = size // bucket_size
    header = 4 * nb
    a, c, _ = _qsgd_levels(bits)
    if out is None:
        out = torch.zeros(rows, size, dtype=torch.float32, device=data.device)
    step = header_floats(data, header).view(rows, nb, 1) * (weight / a)
    level = _empty(ws, "qsgd.level", (rows, size), torch.float32, data.device) if accumulate else out
    if bits <= 2:                                              # the signed level code - c, exact
        unpack_to_float(data[:, header:], bits, -c, 1.0, level, ws)
    elif bits == 16:                                           # stored as the signed level
        level.copy_(data[:, header:].view(torch.int16))
    else:
        codes = data[:, header:] if bits == 8 else \
            unpack_bits(data[:, header:], bits, size, ws=ws,
                        out=_empty(ws, "qsgd.dcodes", (rows, size), torch.uint8, data.device))
        level.copy_(codes).sub_(c)
    if accumulate:
        out.view(rows, nb, bucket_size).addcmul_(level.view(rows, nb, bucket_size), step)
    else:
        level.view(rows, nb, bucket_size).mul_(step)
    return out




# One bit per coordinate: the float's sign bit, so 1 = negative and +0 is sent as +1. Scaled
# sign (``bucket_size`` given) adds one fp32 scale per bucket, mean |x|: for a fixed sign
# pattern the scale minimizing ||x - scale * sign(x)||_2 (1-bit Adam used ||x||_2 / sqrt(d)).

def sign_encode(x: torch.Tensor, bucket_size: Optional[int] = None, out: Optional[torch.Tensor] = None,
                ws: Optional[Workspace] = None, valid: Optional[int] = None) -> torch.Tensor:
    """Rows (R, S), S a multiple of 8 (and of ``bucket_size``) -> (R, [4 S / bucket_size] + S / 8).

    ``valid``: only the first ``valid`` values of ``x`` (row-major) are data, the rest padding;
    a bucket's scale is then the mean |x| over its data values only.
    """
    rows, size = x.shape
    header = 4 * (size // bucket_size) if bucket_size else 0
    if out is None:
        out = torch.empty(rows, sign_bytes(size, bucket_size), dtype=torch.uint8, device=x.device)
    if bucket_size:
        magnitude = _empty(ws, "sign.abs", x.shape, x.dtype, x.device)
        scales = torch.abs(x, out=magnitude).view(rows, -1, bucket_size).sum(2)
        if valid is None or valid >= x.numel():
            scales.div_(bucket_size)
        else:
            start = torch.arange(scales.numel(), device=x.device) * bucket_size
            scales.view(-1).div_((valid - start).clamp_(1, bucket_size))
        out[:, :header].copy_(scales.view(torch.uint8))
    negative = _empty(ws, "sign.bits", (rows, size), torch.uint8, x.device)
    torch.signbit(x, out=negative.view(torch.bool))
    pack_bits(negative, 1, out=out[:, header:], ws=ws)
    return out


def sign_unpack(data: torch.Tensor, size: int, bucket_size: Optional[int] = None,
                ws: Optional[Workspace] = None) -> torch.Tensor:
    """The 0/1 sign bits (R, size) of a ``sign_encode`` payload (1 = negative)."""
    header = 4 * (size // bucket_size) if bucket_size else 0
    return unpack_bits(data[:, header:], 1, size, ws=ws,
                       out=_empty(ws, "sign.dbits", (data.shape[0], size), torch.uint8, data.device))


def sign_decode(data: torch.Tensor, size: int, bucket_size: Optional[int] = None,
                out: Optional[torch.Tensor] = None, ws: Optional[Workspace] = None, weight: float = 1.0,
                accumulate: bool = False) -> torch.Tensor:
    """Payload rows -> +-weight (or +-weight * scale per bucket) fp32 rows (R, size); with
    ``accumulate`` added to ``out`` instead of written."""
    rows = data.shape[0]
    if out is None:
        out = torch.zeros(rows, size, dtype=torch.float32, device=data.device)
    header = 4 * (size // bucket_size) if bucket_size else 0
    signs = _empty(ws, "sign.values", (rows, size), torch.float32, data.device) if accumulate else out
    if bucket_size:                                            # bit b -> (1 - 2 b) scale, exact
        unpack_to_float(data[:, header:], 1, 1.0, -2.0, signs, ws)
        scale = header_floats(data, header).view(rows, -1, 1) * weight
        signs.view(rows, -1, bucket_size).mul_(scale)
    else:
        unpack_to_float(data, 1, weight, -2.0 * weight, signs, ws)
    return out.add_(signs) if accumulate else out


