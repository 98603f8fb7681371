"""Gradient communication: the one place where ranks exchange gradients.

DeepSpeed's own backward all-reduce is switched off (``engine.enable_backward_allreduce =
False``); after ``engine.backward`` a compressor averages the gradients in place, and every
compressor counts the bytes it sends. ``none`` is the fp32 all-reduce every compressor is
measured against.

    >>> c = create("qsgd", bits=4, bucket_size=512, topology="two-sided")
    >>> stats = c.all_reduce_([p.grad for p in model.parameters()])  # doctest: +SKIP

Compressors (``names()``; formulas in METHODS.md section 3):

* ``none``: fp32 ring all-reduce of one flat buffer, the reference.
* ``qsgd``: QSGD with ``bits`` (1..8, or 16) per coordinate and one fp32 norm per bucket of
  ``bucket_size`` values. Unbiased stochastic rounding; codes are bit-packed (16 bits: one
  little-endian int16 signed level per value).
* ``sign_vote``: signSGD / Signum with majority vote, 1 bit per coordinate. The result is the
  vote itself, +1 / -1 per coordinate (0 where the vote is tied, possible only with an even
  number of ranks): the optimizer's learning rate sets the step size.
* ``ef_sign``: scaled sign with worker and server error feedback, the compressor of
  DeepSpeed's former 1-bit Adam / 1-bit LAMB.

Aggregation (``topology``), over ``N`` ranks:

* ``one-sided``: ``all_gather`` of every rank's compressed gradient; every rank decodes all
  ``N`` payloads (its own included, from the gathered bytes) and averages (or votes) locally.
* ``two-sided`` (parameter server, every rank serves a 1/N shard): ``all_to_all`` of the
  compressed shards; each rank decodes and averages (or votes) its shard, re-compresses the
  result and ``all_gather``-s it; every rank decodes the same gathered bytes.

Either way every rank ends with bit-identical gradients: all of them decode the same bytes in
the same order. The flat gradient is zero-padded so that it splits into ``N`` equal shards of
whole buckets (and whole bytes of codes).

Byte accounting (``CommStats.bytes_sent``): the bytes this rank puts on the wire with a
bandwidth-optimal algorithm. A ring all-reduce of ``B`` bytes sends ``2 (N - 1) / N * B`` from
every rank (``none``); an ``all_gather`` of a ``P``-byte payload sends it to ``N - 1`` ranks,
``(N - 1) P``; an ``all_to_all`` of ``N`` shard payloads of ``P`` bytes sends ``(N - 1) P`` (a
rank keeps its own shard). Hence one-sided costs ``(N - 1)`` compressed gradients per rank and
two-sided about ``2 (N - 1) / N`` of one. World size 1 sends 0 bytes, but the compressed
methods still apply their compression round trip, so one process sees the same math.
``CommStats.comm_seconds`` is the wall time spent inside collectives (the device is
synchronized around them), so ``elapsed - comm_seconds`` is the encode/decode cost.

Byzantine ranks (experiments only): a rank listed in ``byzantine_ranks`` runs the honest
algorithm on a corrupted gradient: ``flip`` sends ``-g`` (flipped signs), ``random`` sends
Gaussian noise with the norm of ``g`` (random signs), ``scale`` sends ``-100 g`` (garbage that
dominates a mean; for the sign methods the same as ``flip``).

State (``state_dict()``, tensors only, so it loads with ``torch.load(weights_only=True)``):
``ef_sign`` keeps ``worker_error`` (the padded flat gradient) and ``server_error`` (the
shard this rank serves, two-sided only); ``sign_vote`` with momentum keeps ``momentum``;
``qsgd`` keeps its ``generator`` state when it was given a generator. One compressor instance
serves one gradient layout and world size. On the CPU a compressor also keeps scratch buffers
(``Workspace``, 12 to 24 bytes per gradient value) so that the hot path allocates nothing.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist

from .registry import Registry

COMPRESSORS = Registry("compressor")
TOPOLOGIES = ("one-sided", "two-sided")
BYZANTINE_MODES = ("flip", "random", "scale")
BYZANTINE_SCALE = 100.0

assert sys.byteorder == "little", "bit packing views int64 words as bytes (little-endian)"


@dataclass
class CommStats:
    """What one gradient exchange cost this rank."""
    bytes_sent: int = 0
    comm_seconds: float = 0.0


@dataclass
class Payload:
    """One tensor as it goes on the wire: ``data`` (uint8) is all that is sent; ``shape`` and
    ``dtype`` are known to every rank (same model) and only tell ``decode`` what to rebuild."""
    data: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the pieces of ``flat`` back into ``tensors`` (same order and sizes)."""
    views = torch.split(flat, [t.numel() for t in tensors])
    torch._foreach_copy_(list(tensors), [v.view_as(t) for v, t in zip(views, tensors)])


def flatten_into(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``tensors`` into the leading pieces of ``flat`` (casting to its dtype), no temporaries."""
    views = torch.split(flat[:sum(t.numel() for t in tensors)], [t.numel() for t in tensors])
    torch._foreach_copy_([v.view_as(t) for v, t in zip(views, tensors)], list(tensors))


# --- scratch memory ---------------------------------------------------------------------------

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


# --- bit packing ------------------------------------------------------------------------------
# Codes form a little-endian bit stream: code i of a row occupies bits [i b, (i + 1) b). The
# codes are processed as int64 words of eight one-byte lanes. b = 1 takes one multiply (the
# eight 0/1 bytes land in the top byte without carries, and back with the inverse trick).
# Other widths merge neighbouring lanes in rounds of shift-and-mask (SWAR) until a lane holds a
# whole byte of codes (b = 2, 4: the packed bytes are then the low bytes of int32 / int16
# lanes, taken by integer narrowing) or, for b = 3, 5, 6, 7, until one word holds its b bytes.
# Unpacking runs the rounds backwards; 1- and 2-bit codes can also go straight to floats through
# a 256-entry table per byte value. Everything is vectorized over the tensor; the Python loops
# run over at most three rounds. Arithmetic is modulo 2^64 (int64 wrap-around).

_GATHER_BITS = 0x0102040810204080              # byte i's bit 0 -> bit 56 + i
_SPREAD_BYTE = 0x0101010101010101              # one byte copied into all eight lanes
_SELECT_BITS = 0x8040201008040201 - (1 << 64)  # lane i keeps bit i (as a signed int64)
_LANE_HIGH = 0x7F7F7F7F7F7F7F7F                # + 0x7F turns a non-zero lane's bit 7 on
_LANE_DTYPE = {1: torch.int64, 2: torch.int32, 4: torch.int16}   # lane holding one packed byte


def _lane_mask(width: int, lane: int) -> int:
    """An int64 mask keeping the low ``width`` bits of every ``lane``-bit lane."""
    one = (1 << width) - 1
    return sum(one << s for s in range(0, 64, lane))


def _rounds(bits: int):
    """(field width, lane width) of the merge rounds, narrowest first."""
    rounds = [(bits, 8), (2 * bits, 16), (4 * bits, 32)]
    return [r for r in rounds if 2 * r[0] <= 8] if bits in _LANE_DTYPE else rounds


def pack_bits(codes: torch.Tensor, bits: int, out: Optional[torch.Tensor] = None,
              ws: Optional[Workspace] = None) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) of shape (R, m), m a multiple of 8, into (R, m * bits / 8).

    >>> pack_bits(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1]], dtype=torch.uint8), 1)
    tensor([[141]], dtype=torch.uint8)
    """
    rows, m = codes.shape
    assert m % 8 == 0 and 1 <= bits <= 8
    if out is None:
        out = torch.empty(rows, m * bits // 8, dtype=torch.uint8, device=codes.device)
    if bits == 8:
        return out.copy_(codes)
    words = codes.contiguous().view(torch.int64)              # (R, m / 8): 8 codes per word
    acc = _empty(ws, "pack.acc", words.shape, torch.int64, codes.device)
    if bits == 1:
        torch.mul(words, _GATHER_BITS, out=acc).bitwise_right_shift_(56)
    else:
        tmp = _empty(ws, "pack.tmp", words.shape, torch.int64, codes.device)
        acc.copy_(words)
        for width, lane in _rounds(bits):
            # pairs of lanes: keep the even lane's field, move the odd lane's field next to it
            low = _lane_mask(width, 2 * lane)
            torch.bitwise_right_shift(acc, lane - width, out=tmp).bitwise_and_(low << width)
            acc.bitwise_and_(low).bitwise_or_(tmp)
    if bits in _LANE_DTYPE:   # every lane's low byte is one packed byte
        return out.copy_(acc.view(_LANE_DTYPE[bits]).view(rows, -1))
    out.view(rows, m // 8, bits).copy_(acc.view(torch.uint8).view(rows, m // 8, 8)[..., :bits])
    return out


def unpack_bits(packed: torch.Tensor, bits: int, m: int, out: Optional[torch.Tensor] = None,
                ws: Optional[Workspace] = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: (R, m * bits / 8) bytes -> (R, m) uint8 codes."""
    rows, groups = packed.shape[0], m // 8
    assert m % 8 == 0 and packed.shape[1] == m * bits // 8
    if out is None:
        out = torch.empty(rows, m, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return out.copy_(packed)
    direct = out.is_contiguous()
    codes = out if direct else _empty(ws, "unpack.codes", (rows, m), torch.uint8, packed.device)
    acc = codes.view(torch.int64)                             # (R, m / 8)
    if bits in _LANE_DTYPE:   # one packed byte into the low byte of every lane, zero-extended
        codes.view(_LANE_DTYPE[bits]).copy_(packed)
    else:
        word = codes.view(rows, groups, 8)
        word[..., bits:].zero_()
        word[..., :bits].copy_(packed.view(rows, groups, bits))
    if bits == 1:
        acc.mul_(_SPREAD_BYTE).bitwise_and_(_SELECT_BITS).add_(_LANE_HIGH)
        acc.bitwise_right_shift_(7).bitwise_and_(_SPREAD_BYTE)
    else:
        tmp = _empty(ws, "unpack.tmp", acc.shape, torch.int64, packed.device)
        for width, lane in reversed(_rounds(bits)):
            # split every double lane: the upper field moves to the start of the odd lane
            low = _lane_mask(width, 2 * lane)
            torch.bitwise_left_shift(acc, lane - width, out=tmp).bitwise_and_(low << lane)
            acc.bitwise_and_(low).bitwise_or_(tmp)
    return out if direct else out.copy_(codes)


_TABLES: Dict[tuple, torch.Tensor] = {}


def _byte_table(bits: int, offset: float, step: float, device) -> torch.Tensor:
    """(256, 8 / bits) fp32: the codes packed in each byte value, as offset + step * code."""
    key = (bits, offset, step, torch.device(device))
    if key not in _TABLES:
        codes = (torch.arange(256).unsqueeze(1) >> (torch.arange(8 // bits) * bits)) & ((1 << bits) - 1)
        _TABLES[key] = (offset + step * codes).float().to(device)
    return _TABLES[key]


def unpack_to_float(packed: torch.Tensor, bits: int, offset: float, step: float, out: torch.Tensor,
                    ws: Optional[Workspace] = None) -> torch.Tensor:
    """Packed codes of 1 or 2 bits straight to fp32 ``offset + step * code`` in ``out`` (R, m),
    contiguous: one table lookup per byte (4 or 8 values), cheaper than unpacking then converting."""
    assert bits in (1, 2) and out.is_contiguous()
    index = _empty(ws, "lookup.index", packed.shape, torch.int32, packed.device).copy_(packed)
    torch.index_select(_byte_table(bits, offset, step, packed.device), 0, index.view(-1),
                       out=out.view(-1, 8 // bits))
    return out


# --- QSGD -------------------------------------------------------------------------------------
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

def _qsgd_levels(bits: int) -> Tuple[float, float, int]:
    """(a, c, largest code) of the affine map t = a v / ||v|| + c."""
    if bits == 1:
        return 0.5, 0.5, 1
    s = 2 ** (bits - 1) - 1
    return float(s), float(s), 2 * s


def _random16(numel: int, generator, device, ws: Optional[Workspace]) -> torch.Tensor:
    """``numel`` uniform int16 values (16 random bits each), 4 per 64-bit draw."""
    words = _empty(ws, "rand.words", ((numel + 3) // 4,), torch.int64, device)
    words.random_(-2 ** 63, None, generator=generator)
    return words.view(torch.int16)[:numel]


def qsgd_bytes(numel: int, bits: int, bucket_size: int) -> int:
    """Payload bytes of ``numel`` values: one fp32 norm per bucket + ``bits`` per value."""
    return 4 * math.ceil(numel / bucket_size) + math.ceil(numel * bits / 8)


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
    step = data[:, :header].contiguous().view(torch.float32).view(rows, nb, 1) * (weight / a)
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


# --- signs ------------------------------------------------------------------------------------
# One bit per coordinate: the float's sign bit, so 1 = negative and +0 is sent as +1. Scaled
# sign (``bucket_size`` given) adds one fp32 scale per bucket, mean |x|: for a fixed sign
# pattern the scale minimizing ||x - scale * sign(x)||_2 (1-bit Adam used ||x||_2 / sqrt(d)).

def sign_bytes(numel: int, bucket_size: Optional[int] = None) -> int:
    return (4 * math.ceil(numel / bucket_size) if bucket_size else 0) + math.ceil(numel / 8)


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
        scale = data[:, :header].contiguous().view(torch.float32).view(rows, -1, 1) * weight
        signs.view(rows, -1, bucket_size).mul_(scale)
    else:
        unpack_to_float(data, 1, weight, -2.0 * weight, signs, ws)
    return out.add_(signs) if accumulate else out


# --- collectives ------------------------------------------------------------------------------

def _world() -> Tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size(), tdist.get_rank()
    return 1, 0


def _timed(stats: CommStats, device: torch.device, fn: Callable, *args) -> None:
    """Run one collective; add its wall time (device synchronized) to ``stats``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    stats.comm_seconds += time.perf_counter() - t0


def _all_gather(stats: CommStats, out: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """(1, P) from every rank -> (N, P) in rank order; world size 1 copies."""
    if out.shape[0] == 1:
        return out.copy_(row)
    _timed(stats, row.device, tdist.all_gather_into_tensor, out, row)
    stats.bytes_sent += (out.shape[0] - 1) * row.numel() * row.element_size()
    return out


def _all_to_all(stats: CommStats, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row k of every rank's (N, P) goes to rank k; out row j is what rank j sent."""
    if out.shape[0] == 1:
        return out.copy_(rows)
    _timed(stats, rows.device, tdist.all_to_all_single, out, rows)
    stats.bytes_sent += (out.shape[0] - 1) * rows[0].numel() * rows.element_size()
    return out


# --- settings ---------------------------------------------------------------------------------

def _check_int(name: str, value, low: int, high: Optional[int] = None, multiple: int = 1) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and \
        (high is None or value <= high) and value % multiple == 0
    if not ok:
        allowed = f"an integer from {low} to {high}" if high is not None else \
            f"a positive multiple of {multiple}" if multiple > 1 else f"an integer >= {low}"
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {allowed}")
    return value


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(choices)}")
    return value


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


# --- compressors ------------------------------------------------------------------------------

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

    def __init__(self, byzantine_ranks: Sequence[int] = (), byzantine_mode: str = "scale",
                 generator: Optional[torch.Generator] = None):
        self.byzantine_ranks, self.byzantine_mode = _check_byzantine(byzantine_ranks, byzantine_mode)
        self.generator = generator

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float().reshape(-1)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        return payload

    def all_reduce_(self, grads: List[torch.Tensor]) -> CommStats:
        world, rank = _world()
        if world == 1 or not grads:
            return CommStats(0)
        flat = flatten(grads)
        if rank in self.byzantine_ranks:
            corrupt_(flat, self.byzantine_mode, self.generator)
        stats = CommStats()
        _timed(stats, flat.device, tdist.all_reduce, flat)
        flat.div_(world)
        unflatten_into(flat, grads)
        # A ring all-reduce sends 2 (N - 1) / N of the buffer from every rank.
        stats.bytes_sent = int(2 * (world - 1) * flat.numel() * flat.element_size() / world)
        return stats


class _Compressed(Compressor):
    """Shared machinery of the compressed methods: padding, topologies, Byzantine ranks, state.

    A subclass supplies the codec (``_encode``/``_decode`` on aligned rows, ``unit`` = the
    alignment, ``_bits``/``_header`` for trimming single-tensor payloads), the worker step
    (``_worker``: state such as error feedback or momentum), the aggregation of the N
    contributions to a shard (``_reduce``) and the server step (``_serve``/``_unserve``).
    """

    unit = 8
    state_names: Tuple[str, ...] = ()

    def __init__(self, topology: str, byzantine_ranks: Sequence[int], byzantine_mode: str,
                 generator: Optional[torch.Generator]):
        self.topology = _check_choice("topology", topology, TOPOLOGIES)
        self.byzantine_ranks, self.byzantine_mode = _check_byzantine(byzantine_ranks, byzantine_mode)
        self.generator = generator
        self._ws = Workspace()
        self._state: Dict[str, torch.Tensor] = {}

    # -- single tensor ------------------------------------------------------------------------
    def encode(self, tensor: torch.Tensor) -> Payload:
        """What this rank would send for ``tensor`` (worker state and Byzantine role included)."""
        n = tensor.numel()
        size = _round_up(n, self.unit)
        flat = torch.zeros(1, size, dtype=torch.float32, device=tensor.device)
        flat[0, :n].copy_(tensor.detach().reshape(-1))
        if _world()[1] in self.byzantine_ranks:
            corrupt_(flat[0, :n], self.byzantine_mode, self.generator)
        data = self._worker(flat, n, None, None)
        keep = self._header(size) + math.ceil(n * self._bits / 8)   # drop the padding's code bytes
        return Payload(data[0, :keep].clone(), tensor.shape, tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        n = math.prod(payload.shape)
        size = _round_up(n, self.unit)
        data = torch.zeros(1, self._header(size) + size * self._bits // 8, dtype=torch.uint8,
                           device=payload.data.device)
        data[0, :payload.nbytes].copy_(payload.data)
        return self._decode(data, size, None, None)[0, :n].view(payload.shape).to(payload.dtype)

    # -- collective ---------------------------------------------------------------------------
    def all_reduce_(self, grads: List[torch.Tensor]) -> CommStats:
        """Average ``grads`` over ranks in place through the compressor; see the module doc."""
        stats = CommStats()
        if not grads:
            return stats
        world, rank = _world()
        n = sum(g.numel() for g in grads)
        flat = self._ws.get("flat", (_round_up(n, world * self.unit),), torch.float32, grads[0].device)
        flat[n:].zero_()
        flatten_into(grads, flat)
        if rank in self.byzantine_ranks:
            corrupt_(flat[:n], self.byzantine_mode, self.generator)
        if self.topology == "one-sided":
            result = self._one_sided(flat, n, world, stats)
        else:
            result = self._two_sided(flat, n, world, rank, stats)
        unflatten_into(result[:n], grads)
        return stats

    def _one_sided(self, flat: torch.Tensor, n: int, world: int, stats: CommStats) -> torch.Tensor:
        size = flat.numel()
        send = self._worker(flat.view(1, size), n, self._ws, "send")
        recv = _all_gather(stats, self._ws.get("recv", (world, send.shape[1]), torch.uint8, flat.device), send)
        return self._reduce(recv, size).view(-1)

    def _two_sided(self, flat: torch.Tensor, n: int, world: int, rank: int, stats: CommStats) -> torch.Tensor:
        size = flat.numel() // world
        send = self._worker(flat.view(world, size), n, self._ws, "send")
        recv = _all_to_all(stats, self._ws.get("recv", send.shape, torch.uint8, flat.device), send)
        agg = self._reduce(recv, size)
        valid = min(max(n - rank * size, 0), size)     # data values in the shard this rank serves
        agg[valid:].zero_()                            # padding decodes to noise; keep it out of norms
        served = self._serve(agg.view(1, size), valid, world)
        gathered = _all_gather(stats, self._ws.get("gathered", (world, served.shape[1]), torch.uint8,
                                                   flat.device), served)
        return self._unserve(gathered, size, world).view(-1)

    def _mean(self, data: torch.Tensor, size: int) -> torch.Tensor:
        """Decode the N payload rows one by one, in rank order, into their average."""
        acc = self._ws.get("acc", (1, size), torch.float32, data.device)
        for r in range(data.shape[0]):
            self._decode(data[r:r + 1], size, self._ws, acc, weight=1 / data.shape[0], accumulate=r > 0)
        return acc.view(-1)

    def _out(self, tag: str, rows: int, size: int, device) -> torch.Tensor:
        return self._ws.get(tag, (rows, size), torch.float32, device)

    # -- state --------------------------------------------------------------------------------
    def _buffer(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._state.get(name)
        if buf is None:
            buf = self._state[name] = torch.zeros(numel, dtype=torch.float32, device=like.device)
        elif buf.numel() != numel:
            raise ValueError(f"{self.name}: the {name} buffer holds {buf.numel()} values but this exchange "
                             f"needs {numel}; use one compressor per gradient layout and world size")
        elif buf.device != like.device:
            buf = self._state[name] = buf.to(like.device)
        return buf

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.state_names))
        if unknown:
            raise ValueError(f"{self.name}: unexpected state {', '.join(unknown)}; "
                             f"it keeps: {', '.join(self.state_names) or 'nothing'}")
        self._state = {k: torch.as_tensor(v).detach().clone().float() for k, v in state.items()}


def _round_up(n: int, unit: int) -> int:
    return max(1, math.ceil(n / unit)) * unit


@COMPRESSORS.register("qsgd")
class QSGD(_Compressed):
    """QSGD (Alistarh 2017): ``bits`` per value (1..8 or 16), one fp32 norm per ``bucket_size`` values.

    Two-sided, the server re-quantizes the averaged shard with the same settings. Randomness
    comes from ``generator`` (its device must be the gradients'), else the global RNG.
    """

    name = "qsgd"
    state_names = ("generator",)

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
        return qsgd_encode(x, self.bits, self.bucket_size, self.generator, out=out, ws=ws)

    def _decode(self, data, size, ws, out=None, weight=1.0, accumulate=False):
        return qsgd_decode(data, self.bits, self.bucket_size, size, out, ws, weight, accumulate)

    def _worker(self, x, valid, ws, tag):
        return self._encode(x, ws, tag)

    _reduce = _Compressed._mean

    def _serve(self, agg, valid, world):
        return self._encode(agg, self._ws, "served")

    def _unserve(self, data, size, world):
        return self._decode(data, size, self._ws, self._out("result", data.shape[0], size, data.device))

    def state_dict(self) -> dict:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - {"generator"})
        if unknown:
            raise ValueError(f"qsgd: unexpected state {', '.join(unknown)}; it keeps: generator")
        if "generator" in state and self.generator is not None:
            self.generator.set_state(state["generator"])


@COMPRESSORS.register("ef_sign")
class ErrorFeedbackSign(_Compressed):
    """Scaled sign with error feedback on workers and servers (1-bit Adam / 1-bit LAMB's
    compressor): a worker sends C(g + e_w), C(c) = mean|c| * sign(c) per bucket of
    ``bucket_size`` values, and keeps e_w = c - C(c). Two-sided, the server of a shard adds its
    error e_s to the average, sends C(avg + e_s) and keeps the residual. One-sided has no
    server step: every rank averages the decoded payloads exactly.
    """

    name = "ef_sign"
    state_names = ("worker_error", "server_error")
    _bits = 1

    def __init__(self, bucket_size: int = 2048, topology: str = "one-sided", byzantine_ranks: Sequence[int] = (),
                 byzantine_mode: str = "flip", generator: Optional[torch.Generator] = None):
        super().__init__(topology, byzantine_ranks, byzantine_mode, generator)
        self.bucket_size = self.unit = _check_int("bucket_size", bucket_size, 8, multiple=8)

    def _header(self, size: int) -> int:
        return 4 * (size // self.bucket_size)

    def _encode(self, x, ws, tag, valid=None):
        out = None if ws is None else ws.get(tag, (x.shape[0], sign_bytes(x.shape[1], self.bucket_size)),
                                             torch.uint8, x.device)
        return sign_encode(x, self.bucket_size, out=out, ws=ws, valid=valid)

    def _decode(self, data, size, ws, out=None, weight=1.0, accumulate=False):
        return sign_decode(data, size, self.bucket_size, out, ws, weight, accumulate)

    def _feedback(self, name: str, x: torch.Tensor, valid: int, ws, tag) -> torch.Tensor:
        """Send C(x + e) and keep e <- x + e - C(x + e); the first ``valid`` values are data,
        the padding after them keeps no error."""
        rows, size = x.shape
        nb = size // self.bucket_size
        err = self._buffer(name, x.numel(), x).view(rows, nb, self.bucket_size)
        data = self._encode(err.add_(x.view_as(err)).view_as(x), ws, tag, valid)
        scales = data[:, :4 * nb].contiguous().view(torch.float32).view(rows, nb, 1)
        # C(c) is +-scale with the sign bit of c: exactly what decode returns for these bytes
        sent = torch.copysign(scales, err, out=_empty(ws, "ef.sent", err.shape, torch.float32, x.device))
        err.sub_(sent).view(-1)[valid:].zero_()
        return data

    def _worker(self, x, valid, ws, tag):
        return self._feedback("worker_error", x, valid, ws, tag)

    _reduce = _Compressed._mean

    def _serve(self, agg, valid, world):
        return self._feedback("server_error", agg, valid, self._ws, "served")

    def _unserve(self, data, size, world):
        return self._decode(data, size, self._ws, self._out("result", data.shape[0], size, data.device))


@COMPRESSORS.register("sign_vote")
class SignVote(_Compressed):
    """signSGD (``momentum`` 0) / Signum with majority vote (Bernstein 2018).

    A worker sends sign(g), or sign(m) with m <- momentum m + (1 - momentum) g; the result is
    sign(sum of the N signs), +-1 per coordinate, 0 on a tie (even N only). Two-sided, the
    server returns its shard's vote in 1 bit (odd N) or 2 bits (even N: the tie needs a third
    value).
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
        return sign_encode(x, None, out=out, ws=ws)

    def _decode(self, data, size, ws, out=None, weight=1.0, accumulate=False):
        return sign_decode(data, size, None, out, ws, weight, accumulate)

    def _worker(self, x, valid, ws, tag):
        if self.momentum:
            m = self._buffer("momentum", x.numel(), x).view_as(x)
            x = m.mul_(self.momentum).add_(x, alpha=1 - self.momentum)
        return self._encode(x, ws, tag)

    def _reduce(self, data: torch.Tensor, size: int) -> torch.Tensor:
        """Majority vote of the N payload rows: sign(N / 2 - #negative)."""
        world = data.shape[0]
        count = self._ws.get("count", (size,), torch.uint8 if world < 256 else torch.int32, data.device)
        for r in range(world):    # count the negative signs
            bits = sign_unpack(data[r:r + 1], size, None, self._ws).view(-1)
            count.copy_(bits) if r == 0 else count.add_(bits)
        vote = self._ws.get("vote", (size,), torch.float32, data.device)
        return vote.copy_(count).sub_(world / 2).neg_().sign_()

    def _serve(self, agg, valid, world):
        if world % 2:
            return self._encode(agg, self._ws, "served")
        codes = self._ws.get("vote.codes", agg.shape, torch.uint8, agg.device)
        out = self._ws.get("served", (1, agg.shape[1] // 4), torch.uint8, agg.device)
        return pack_bits(codes.copy_(agg.add_(1)), 2, out=out, ws=self._ws)   # -1, 0, 1 -> 0, 1, 2

    def _unserve(self, data, size, world):
        out = self._ws.get("result", (data.shape[0], size), torch.float32, data.device)
        if world % 2:
            return sign_decode(data, size, None, out=out, ws=self._ws)
        codes = unpack_bits(data, 2, size, out=self._ws.get("vote.dcodes", (data.shape[0], size), torch.uint8,
                                                            data.device), ws=self._ws)
        return out.copy_(codes).sub_(1)


def create(name: str, **kwargs) -> Compressor:
    """Build a registered compressor, e.g. ``create("qsgd", bits=4, topology="two-sided")``."""
    return COMPRESSORS.create(name, **kwargs)


def names():
    return COMPRESSORS.names()
