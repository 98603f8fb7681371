"""``sweep``: dat-ds run as a tuned run runs (``--channels-last on --compile on``, bf16 autocast)
at each micro-batch of the plan's sweep (ResNet-50: 128, 256, 512), natural and PGD-3: images/s
and peak device memory, to find the batch that fills the device. A batch that does not fit is
recorded as such and the larger ones are skipped."""
from __future__ import annotations

import dataclasses

import torch

from dat_ds import attacks

from .harness import (METHODS, Clock, Plan, build_bench, dat_ds_run, guarded, peak_memory_gb,
                      reset_peak_memory)

SWEPT = ("natural", "pgd-3")


def sweep_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    spec = plan.models[0]
    out = {"model": spec.name, "img_size": spec.img_size, "dtype": plan.dtype or "float32",
           "compile_backend": plan.compile_backend, "batches": []}
    for batch in plan.sweep:
        row = guarded(sweep_one, dataclasses.replace(spec, batch=batch), plan, device, clock, batch=batch)
        out["batches"].append(row)
        if "error" in row:
            break
    return out


def sweep_one(spec, plan: Plan, device: torch.device, clock: Clock) -> dict:
    reset_peak_memory(device)
    try:
        b = build_bench(spec, plan, device, tuned=True)
        out = {}
        for label in SWEPT:
            name, kw = next((n, k) for m, n, k in METHODS if m == label)
            run = dat_ds_run(b, attacks.create(name, **kw), label=f"sweep/{label}")
            run(plan.warmup)
            seconds = min(clock.time(lambda: run(plan.steps)) for _ in range(plan.rounds)) / plan.steps
            out[f"{label}_images_per_s"] = spec.batch / seconds
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_memory_gb": peak_memory_gb(device)}
    out["peak_memory_gb"] = peak_memory_gb(device)
    del b
    reset_peak_memory(device)
    return out
