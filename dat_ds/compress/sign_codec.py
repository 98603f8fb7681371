"""The sign codec: one bit per value (the float's sign bit, so 1 = negative and +0 is sent as +1).

Scaled sign (``bucket_size`` given) puts one fp32 scale per bucket before the bits: mean |x|,
for a fixed sign pattern the scale minimizing ||x - scale * sign(x)||_2 (1-bit Adam used
||x||_2 / sqrt(d)). The bits are packed by ``kernels`` (eight values per byte, value k of a
group in bit k), compiled for large inputs; the scales are eager reductions.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import kernels
from .bits import header_floats, pack_bits, unpack_bits, unpack_to_float
from .workspace import _empty


def sign_bytes(numel: int, bucket_size: Optional[int] = None) -> int:
    return (4 * math.ceil(numel / bucket_size) if bucket_size else 0) + math.ceil(numel / 8)


def _scales(x: torch.Tensor, bucket_size: int, valid: Optional[int]) -> torch.Tensor:
    """Mean |x| per bucket (R, nb, 1), counting only the first ``valid`` values (row-major) as data."""
    rows, size = x.shape
    scales = torch.linalg.vector_norm(x.view(rows, -1, bucket_size), ord=1, dim=2, keepdim=True)
    if valid is None or valid >= x.numel():
        return scales.div_(bucket_size)
    start = torch.arange(scales.numel(), device=x.device) * bucket_size
    return scales.view(-1).div_((valid - start).clamp_(1, bucket_size)).view_as(scales)


def _encode_eager(out, x, ws=None):
    """``kernels.sign_encode_kernel``: the sign bits as bytes, then SWAR-packed (same bytes)."""
    rows = x.shape[0]
    negative = _empty(ws, "sign.bits", (rows, x[0].numel()), torch.uint8, x.device)
    torch.signbit(x.reshape(rows, -1), out=negative.view(torch.bool))
    pack_bits(negative, 1, out=out.view(rows, -1), ws=ws)


def _ef_eager(out, err, scale, ws=None):
    _encode_eager(out, err, ws)
    err.sub_(torch.copysign(scale, err, out=_empty(ws, "ef.sent", err.shape, torch.float32, err.device)))


def _decode_eager(out, data, scale, *, bucket, mean, accumulate, ws=None):
    """``kernels.sign_decode_kernel`` row by row: a table lookup per byte, times the scale."""
    rows, size = data.shape[0], data.shape[1] * 8
    packed = data.view(rows, -1)
    for r in range(rows) if mean else [None]:
        part = packed if r is None else packed[r:r + 1]
        n = part.shape[0]
        target = out.view(1 if mean else n, -1, bucket)
        first = not accumulate and (r is None or r == 0)
        signs = target if first else _empty(ws, "sign.values", target.shape, torch.float32, data.device)
        unpack_to_float(part, 1, 1.0, -2.0, signs.view(n, size), ws)
        signs.mul_(scale if r is None else scale[r:r + 1])
        if not first:
            target.add_(signs)


def _vote_eager(out, data, ws=None):
    world, groups = data.shape[0], data.shape[1]
    count = _empty(ws, "count", (groups * 8,), torch.uint8 if world < 256 else torch.int32, data.device)
    for r in range(world):    # count the negative signs
        bits = unpack_bits(data[r].view(1, -1), 1, groups * 8, ws=ws,
                           out=_empty(ws, "sign.dbits", (1, groups * 8), torch.uint8, data.device)).view(-1)
        count.copy_(bits) if r == 0 else count.add_(bits)
    out.view(-1).copy_(count).sub_(world / 2).neg_().sign_()


def codes_encode(out, values, *, bits, offset, ws=None):
    """``kernels.codes_encode_kernel`` eagerly: small integers (+ offset) as packed codes."""
    rows = values.shape[0]
    codes = _empty(ws, "codes", (rows, values[0].numel()), torch.uint8, values.device)
    codes.copy_(values.reshape(rows, -1)).add_(offset)
    pack_bits(codes, bits, out=out.view(rows, -1), ws=ws)


def codes_decode(out, data, *, bits, offset, ws=None):
    rows = data.shape[0]
    size = data[0].numel() * 8 // bits
    codes = unpack_bits(data.view(rows, -1), bits, size, ws=ws,
                        out=_empty(ws, "dcodes", (rows, size), torch.uint8, data.device))
    out.view(rows, -1).copy_(codes).sub_(offset)


def sign_encode(x: torch.Tensor, bucket_size: Optional[int] = None, out: Optional[torch.Tensor] = None,
                ws=None, valid: Optional[int] = None) -> torch.Tensor:
    """Rows (R, S), S a multiple of 8 (and of ``bucket_size``) -> (R, [4 S / bucket_size] + S / 8).

    ``valid``: only the first ``valid`` values of ``x`` (row-major) are data, the rest padding;
    a bucket's scale is then the mean |x| over its data values only.
    """
    rows, size = x.shape
    header = 4 * (size // bucket_size) if bucket_size else 0
    if out is None:
        out = torch.empty(rows, sign_bytes(size, bucket_size), dtype=torch.uint8, device=x.device)
    if bucket_size:
        out[:, :header].copy_(_scales(x, bucket_size, valid).view(rows, -1).view(torch.uint8))
    kernels.run(kernels.sign_encode_kernel, functools.partial(_encode_eager, ws=ws), x.numel(),
                out[:, header:].view(rows, size // 8, 1), x.view(rows, size // 8, 8))
    return out


def ef_encode(err: torch.Tensor, bucket_size: int, valid: int, out: Optional[torch.Tensor] = None,
              ws=None) -> torch.Tensor:
    """Error feedback's send step on rows c = ``err`` (R, S): returns the scaled-sign payload of c
    and leaves c - C(c) in ``err`` (what the receivers decode, subtracted), in one pass."""
    rows, size = err.shape
    header = 4 * (size // bucket_size)
    if out is None:
        out = torch.empty(rows, sign_bytes(size, bucket_size), dtype=torch.uint8, device=err.device)
    scales = _scales(err, bucket_size, valid)
    out[:, :header].copy_(scales.view(rows, -1).view(torch.uint8))
    kernels.run(kernels.ef_encode_kernel, functools.partial(_ef_eager, ws=ws), err.numel(),
                out[:, header:].view(rows, size // 8, 1), err.view(rows, -1, bucket_size), scales)
    return out


def sign_decode(data: torch.Tensor, size: int, bucket_size: Optional[int] = None,
                out: Optional[torch.Tensor] = None, ws=None, weight: float = 1.0,
                accumulate: bool = False, mean: bool = False) -> torch.Tensor:
    """Payload rows -> +-weight (or +-weight * scale per bucket) fp32 rows (R, size); with
    ``mean`` the rows' sum (size,) in one pass; with ``accumulate`` added to ``out``."""
    rows = data.shape[0]
    if out is None:
        out = torch.zeros((size,) if mean else (rows, size), dtype=torch.float32, device=data.device)
    header = 4 * (size // bucket_size) if bucket_size else 0
    bucket = bucket_size or size
    if bucket_size:
        scale = header_floats(data, header).view(rows, -1, 1) * weight
    else:
        scale = torch.full((rows, 1, 1), float(weight), device=data.device)
    target = out.view(-1, bucket) if mean else out.view(rows, -1, bucket)
    kernels.run(kernels.sign_decode_kernel, functools.partial(_decode_eager, ws=ws), rows * size, target,
                data[:, header:].view(rows, size // 8, 1), scale,
                bucket=bucket, mean=mean, accumulate=accumulate)
    return out


def majority_vote(data: torch.Tensor, size: int, out: Optional[torch.Tensor] = None, ws=None) -> torch.Tensor:
    """Majority vote of N rows of unscaled sign bits: sign(N / 2 - #negative) per value, (size,)."""
    if out is None:
        out = torch.empty(size, dtype=torch.float32, device=data.device)
    kernels.run(kernels.vote_kernel, functools.partial(_vote_eager, ws=ws), data.numel() * 8, out.view(-1, 8),
                data.view(data.shape[0], size // 8, 1))
    return out
