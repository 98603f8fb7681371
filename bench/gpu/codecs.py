"""``codec``: every compressor's encode + decode (``all_reduce_flat_`` at world size 1, what a
training step runs) on the device, GB/s of fp32 gradient beside a plain copy of the buffer.
``powersgd``: PowerSGD's exchange with its matrices stacked by shape (batched products and
orthogonalizations; a GPU's form) beside its per-tensor form (``use_baseline_codec``; the CPU's),
interleaved, same gradient, same bytes."""
from __future__ import annotations

import math

import torch

from dat_ds import compress
from dat_ds.models import create_model

from .harness import Clock, Plan, guarded


def gradient_layout(plan: Plan) -> list:
    spec = plan.dist_model
    return [p.shape for p in create_model(spec.name, 10, 3, spec.img_size, stem=spec.stem).parameters()]


def codec_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    """Encode + decode of every compressor at world size 1 on the device, against a plain copy."""
    shapes = gradient_layout(plan)
    numel = sum(math.prod(s) for s in shapes)
    source = (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 1e-3).to(device)
    target = torch.empty_like(source)
    copy_s = clock.each(lambda: target.copy_(source), plan.codec_repeats)
    gbps = 4 * numel / 1e9
    out = {"model": plan.dist_model.name, "numel": numel, "tensors": len(shapes), "copy_gbps": gbps / copy_s,
           "compressors": []}
    for name in compress.names():
        out["compressors"].append(guarded(codec_one, name, source, shapes, plan, clock, gbps / copy_s,
                                          compressor=name))
    out["compile_seconds"] = dict(compress.kernels.COMPILE_SECONDS)
    return out


def codec_one(name: str, source: torch.Tensor, shapes: list, plan: Plan, clock: Clock, copy_gbps: float) -> dict:
    numel = source.numel()
    c = compress.create(name)
    flat = torch.zeros(c.padded_numel(numel, 1), device=source.device)
    refill = lambda: flat[:numel].copy_(source)  # noqa: E731
    first = clock.each(lambda: c.all_reduce_flat_(flat, numel, shapes), 1, refill)  # compiles (or loads) kernels
    seconds = clock.each(lambda: c.all_reduce_flat_(flat, numel, shapes), plan.codec_repeats, refill)
    gbps = 4 * numel / seconds / 1e9
    return {"compressor": name, "ms": 1e3 * seconds, "gbps": gbps, "ratio_to_copy": gbps / copy_gbps,
            "first_call_s": first, "compiled": compress.kernels.use_compiled(numel),
            "finite": bool(torch.isfinite(flat[:numel]).all())}



def powersgd_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    """PowerSGD (rank 1 and 4) grouped by shape against per tensor on the ``dist_model``'s gradient,
    timed alternately (A B A B ...); GB/s of fp32 gradient and the speed-up."""
    shapes = gradient_layout(plan)
    numel = sum(math.prod(s) for s in shapes)
    source = (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 1e-3).to(device)
    layout = compress.create("powersgd")._layout(shapes)
    out = {"model": plan.dist_model.name, "numel": numel, "tensors": len(shapes), "matrices": len(layout.matrices),
           "shapes": len(layout.groups), "ranks": []}
    for rank in (1, 4):
        out["ranks"].append(guarded(powersgd_one, rank, source, shapes, plan, clock, matrix_rank=rank))
    return out


def powersgd_one(rank: int, source: torch.Tensor, shapes: list, plan: Plan, clock: Clock) -> dict:
    numel = source.numel()
    forms = {"grouped": compress.create("powersgd", matrix_rank=rank),
             "per tensor": compress.create("powersgd", matrix_rank=rank).use_baseline_codec()}
    forms["grouped"].grouped = True  # also on a CPU, which takes the per-tensor form by default
    flats = {k: torch.zeros(numel, device=source.device) for k in forms}
    for k, c in forms.items():  # first call: layout, workspaces, Q
        c.all_reduce_flat_(flats[k].copy_(source), numel, shapes)
    # one step from the same state compares the two forms; the timed steps below warm-start Q and carry the
    # error, so rounding differences (batched against single products) compound over them, most where a
    # matrix's singular values near the rank are close
    first = max_rel_diff(flats["grouped"], flats["per tensor"])
    same = bool(torch.allclose(flats["grouped"], flats["per tensor"], rtol=1e-4, atol=1e-6))
    samples = {k: [] for k in forms}
    for _ in range(max(plan.rounds, 3)):
        for k, c in forms.items():
            samples[k].append(clock.each(lambda c=c, k=k: c.all_reduce_flat_(flats[k], numel, shapes),
                                         plan.codec_repeats, lambda k=k: flats[k].copy_(source)))
    seconds = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    gbps = {k: 4 * numel / s / 1e9 for k, s in seconds.items()}
    return {"grouped_ms": 1e3 * seconds["grouped"], "per_tensor_ms": 1e3 * seconds["per tensor"],
            "grouped_gbps": gbps["grouped"], "per_tensor_gbps": gbps["per tensor"],
            "speedup": seconds["per tensor"] / seconds["grouped"],
            "same_result": same, "max_rel_diff": first, "steps": 1 + max(plan.rounds, 3) * plan.codec_repeats,
            "max_rel_diff_after_steps": max_rel_diff(flats["grouped"], flats["per tensor"])}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest entry of |a - b| over the largest entry of |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
