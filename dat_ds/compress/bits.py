"""Bit packing: b-bit codes as a little-endian bit stream, vectorized over whole tensors."""
from __future__ import annotations

import sys
from typing import Dict, Optional

import torch

from .workspace import Workspace, _empty

assert sys.byteorder == "little", "bit packing views int64 words as bytes (little-endian)"

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



def header_floats(data: torch.Tensor, header: int) -> torch.Tensor:
    """The fp32 values in the first ``header`` bytes of payload rows (R, P), as (R, header / 4).

    Copied first: a row's bytes start anywhere, and a float view needs 4-byte-aligned rows.
    """
    rows = data.shape[0]
    return torch.empty(rows, header, dtype=torch.uint8, device=data.device).copy_(data[:, :header]).view(torch.float32)
