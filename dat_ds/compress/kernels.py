"""Fused codec kernels: one pass over the gradient per encode, one over all ranks' payloads per decode.

Each kernel is a plain PyTorch function that writes its result into an ``out`` tensor. Large
inputs run it through ``torch.compile`` (inductor: C++ on the CPU, Triton on a GPU), which
fuses its elementwise chain into one loop; small inputs, and every input when compilation is
off or unavailable, run its eager twin (in-place passes over scratch buffers, SWAR bit
packing; in the codec modules), which computes the same bytes. Both encode identical bytes:
an encode does integer arithmetic and single float multiplications only (nothing a compiler
may reorder or contract into a fused multiply-add), and the per-bucket reductions (norms, mean
magnitudes) run eagerly before the kernel, on both paths. A decode sums the ranks' values in
one pass; compiled, that sum may round differently in the last bit, so every rank of a job
takes the same path (the choice depends only on sizes every rank shares).

``DAT_DS_COMPILE``: ``0`` never compiles, ``1`` compiles every call, unset compiles calls of at
least ``DAT_DS_COMPILE_MIN`` values (default 2^20: below that the eager kernels take about a
millisecond and a compile takes seconds). A compilation error switches compilation off for the
process, with one line on stderr. Compiled kernels are cached per (kernel, static settings)
here and on disk by inductor (``TORCHINDUCTOR_CACHE_DIR``): the first run on a machine compiles
each kernel (about 10 s each on one CPU core), later runs load them.

Random numbers for stochastic rounding (16 bits per value) are drawn from the compressor's
generator outside the kernels, so both paths round with the same numbers.
"""
from __future__ import annotations

import os
import sys
import time
import types
from typing import Callable, Dict

import torch

_COMPILED: Dict[tuple, Callable] = {}
_FAILED = []              # the first compilation error, once one happened
COMPILE_SECONDS: Dict[str, float] = {}   # kernel -> seconds its first compiled call took


def compile_mode() -> str:
    """``never``, ``always`` or ``large`` (the default), from ``DAT_DS_COMPILE``."""
    value = os.environ.get("DAT_DS_COMPILE", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "never"
    return "always" if value in ("1", "true", "yes", "on") else "large"


def _min_numel() -> int:
    return int(os.environ.get("DAT_DS_COMPILE_MIN", 1 << 20))


def use_compiled(numel: int) -> bool:
    mode = compile_mode()
    if _FAILED or mode == "never":
        return False
    return mode == "always" or numel >= _min_numel()


def run(kernel: Callable, eager: Callable, numel: int, *args, **static):
    """``kernel(*args, **static)`` compiled when ``use_compiled(numel)``, else ``eager(*args,
    **static)``: the same result computed with eager-friendly operations (in-place passes over
    scratch buffers, SWAR bit packing), identical bytes. ``static`` settings (bit width,
    counts) are baked into the compiled code, one compilation per distinct value."""
    if use_compiled(numel):
        # one static-shape compilation per layout: a kernel compiled for symbolic shapes runs
        # many times slower on the CPU, and a job sees only a few layouts
        layout = tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, torch.Tensor))
        key = (kernel.__name__, tuple(sorted(static.items())), layout)
        compiled = _COMPILED.get(key)
        first = compiled is None
        if first:
            compiled = _COMPILED[key] = torch.compile(_specialize(kernel, {**static}, len(_COMPILED)),
                                                      dynamic=False)
        t0 = time.perf_counter()
        try:
            result = compiled(*args)
        except Exception as err:   # no compiler, unsupported backend: the eager kernel is exact too
            _FAILED.append(repr(err))
            print(f"dat_ds.compress: torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  f"running the eager codec", file=sys.stderr)
        else:
            if first:
                COMPILE_SECONDS[f"{key[0]}{dict(static)} {[shape for shape, _, _ in layout]}"] = \
                    time.perf_counter() - t0
            return result
    return eager(*args, **static)


def _specialize(kernel: Callable, static: dict, number: int) -> Callable:
    """A copy of ``kernel`` with its keyword-only settings fixed, on a code object of its own:
    dynamo keeps its compilations (and its limit of recompilations) per code object, so every
    variant compiles once instead of all of them competing for one cache."""
    code = kernel.__code__.replace(co_name=f"{kernel.__name__}__{number}")
    fn = types.FunctionType(code, kernel.__globals__, code.co_name, kernel.__defaults__, kernel.__closure__)
    fn.__kwdefaults__ = {**(kernel.__kwdefaults__ or {}), **static}
    return fn


# --- pieces shared by the kernels -------------------------------------------------------------

def _or_shifted(parts: torch.Tensor, width: int) -> torch.Tensor:
    """parts[..., 0] | parts[..., 1] << width | ...: unrolled, which compiles to a vectorized
    loop (a sum over the last dimension compiles to a slow reduction)."""
    word = parts[..., 0]
    for k in range(1, parts.shape[-1]):
        word = word | (parts[..., k] << (k * width))
    return word


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes (..., G, 8) below 2^bits -> (..., G, bits) uint8: a little-endian bit stream."""
    if bits == 8:
        return codes.to(torch.uint8)
    if 8 % bits == 0:                 # codes do not straddle bytes: pack each byte on its own
        lanes = codes.reshape(*codes.shape[:-2], -1, 8 // bits).to(torch.int32)
        return _or_shifted(lanes, bits).to(torch.uint8).view(*codes.shape[:-1], bits)
    word = _or_shifted(codes.to(torch.int64), bits).unsqueeze(-1)      # 8 codes, up to 56 bits
    return ((word >> (torch.arange(bits, device=codes.device, dtype=torch.int64) * 8)) & 255).to(torch.uint8)


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: (..., G, bits) uint8 -> int codes (..., G, 8)."""
    if bits == 8:
        return data.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        lanes = data.reshape(*data.shape[:-2], -1, 1).to(torch.int32)
        codes = (lanes >> (torch.arange(per, device=data.device, dtype=torch.int32) * bits)) & ((1 << bits) - 1)
        return codes.view(*data.shape[:-1], 8)
    word = _or_shifted(data.to(torch.int64), 8).unsqueeze(-1)
    shifts = torch.arange(8, device=data.device, dtype=torch.int64) * bits
    return ((word >> shifts) & ((1 << bits) - 1)).to(torch.int32)


# --- QSGD -------------------------------------------------------------------------------------
# t = a v / ||v|| + c in fixed point with 16 fractional bits: q = floor(2^16 a v / ||v||), one
# float multiply by the bucket's precomputed scale, then code = (q + 2^16 c + r) >> 16 with r
# uniform in [0, 2^16) (int16 noise + 2^15): E[code] = q / 2^16 + c, t to within 2^-16 of a level.

def qsgd_encode_kernel(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor, *,
                       bits: int, a: float, c: float) -> None:
    """x (R, nb, B) fp32, scale (R, nb, 1) = 2^16 a / ||v|| (0 for a zero bucket), noise
    (R, nb, B) int16 uniform -> codes packed into out (R, nb B / 8, bits) uint8. With q in
    [-2^16 a, 2^16 a] and 2^16 a = 2^16 c, the code lies in [0, 2 c] without clamping."""
    rows = x.shape[0]
    bound = a * 65536.0
    q = torch.floor(torch.clamp(x * scale, -bound, bound)).to(torch.int32)
    codes = (q + noise.to(torch.int32) + (int(c * 65536) + 32768)) >> 16
    out.copy_(pack(codes.view(rows, -1, 8), bits))


def qsgd_decode_kernel(out: torch.Tensor, data: torch.Tensor, step: torch.Tensor, *, bits: int, c: float,
                       bucket: int, mean: bool, accumulate: bool) -> None:
    """data (N, G, bits) codes, step (N, nb, 1) = ||v|| weight / a -> out: (N, nb, B) levels
    times step, or with ``mean`` their sum over the N rows (nb, B), added to out with ``accumulate``."""
    rows = data.shape[0]
    levels = unpack(data, bits).view(rows, -1, bucket).to(torch.float32) - c
    values = levels * step
    if mean:
        values = values.sum(0)
    out.copy_(values + out if accumulate else values)


# --- signs ------------------------------------------------------------------------------------

def sign_bits(x: torch.Tensor) -> torch.Tensor:
    """The fp32 sign bit as an int32 0/1 (``torch.signbit``, -0.0 included), read from the bits."""
    return (x.view(torch.int32) >> 31) & 1


def sign_encode_kernel(out: torch.Tensor, x: torch.Tensor) -> None:
    """x (R, G, 8) -> out (R, G, 1) uint8: bit k of a byte is 1 where value k is negative (sign bit)."""
    out.copy_(pack(sign_bits(x), 1))


def ef_encode_kernel(out: torch.Tensor, err: torch.Tensor, scale: torch.Tensor) -> None:
    """Error feedback's send step on c = err (R, nb, B): out gets the sign bits of c, err becomes
    c - scale * sign(c), exactly what the receiver decodes from those bytes subtracted."""
    rows = err.shape[0]
    out.copy_(pack(sign_bits(err).view(rows, -1, 8), 1))
    err.copy_(err - torch.copysign(scale, err))


def sign_decode_kernel(out: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, *, bucket: int, mean: bool,
                       accumulate: bool) -> None:
    """data (N, G, 1) sign bits, scale (N, nb, 1) -> (1 - 2 bit) scale: (N, nb, B) or with
    ``mean`` summed over the N rows (nb, B)."""
    rows = data.shape[0]
    signs = 1.0 - 2.0 * unpack(data, 1).view(rows, -1, bucket).to(torch.float32)
    values = signs * scale
    if mean:
        values = values.sum(0)
    out.copy_(values + out if accumulate else values)


def vote_kernel(out: torch.Tensor, data: torch.Tensor) -> None:
    """data (N, G, 1) sign bits of N ranks -> out (G, 8) fp32: sign(N / 2 - #negative)."""
    count = unpack(data, 1).sum(0)
    out.copy_(torch.sign(data.shape[0] / 2 - count.to(torch.float32)))


def codes_encode_kernel(out: torch.Tensor, values: torch.Tensor, *, bits: int, offset: int) -> None:
    """Small integers as codes: out (R, G, bits) packs values (R, G, 8) + offset."""
    out.copy_(pack(values.to(torch.int64) + offset, bits))


def codes_decode_kernel(out: torch.Tensor, data: torch.Tensor, *, bits: int, offset: int) -> None:
    out.copy_((unpack(data, bits) - offset).to(out.dtype))
