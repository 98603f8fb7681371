"""``throughput``: images/s of natural, FGSM-RS, PGD-3, PGD-10, Free-4 and ConAdv training through
``dat_ds.trainer.train_epoch`` (DeepSpeed engine, dat-ds LAMB, step guard as a run takes it, bf16
autocast on CUDA) beside a bare PyTorch loop doing the same math with the same optimizer,
interleaved, per model; device synchronizes and host reads per optimizer step
(:class:`dat_ds.syncs.SyncCounter`), the phase split of dat-ds's own timers, and ConAdv's overlap
(:mod:`gpu.conadv`). Both loops are untuned here (contiguous, eager): :mod:`gpu.tuned` compares
against a tuned loop."""
from __future__ import annotations

import torch

from dat_ds import attacks

from .conadv import conadv_overlap
from .harness import (Bench, Clock, ModelSpec, Plan, bare_run, build_bench, count_syncs, dat_ds_run, guarded,
                      interleaved, peak_memory_gb, plan_methods, reset_peak_memory)


def throughput_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    """Every training method through dat-ds and a bare loop, per model; ConAdv's overlap."""
    models = [guarded(model_throughput, spec, plan, device, clock, model=spec.name) for spec in plan.models]
    peaks = [m["peak_memory_gb"] for m in models if "peak_memory_gb" in m]
    return {"models": models, "peak_memory_gb": max(peaks) if peaks else None}


def model_throughput(spec: ModelSpec, plan: Plan, device: torch.device, clock: Clock) -> dict:
    reset_peak_memory(device)
    b = build_bench(spec, plan, device)
    out = {"model": spec.name, "img_size": spec.img_size, "batch": spec.batch, "dtype": plan.dtype or "float32",
           "params_m": sum(p.numel() for p in b.bare.parameters()) / 1e6, "methods": []}
    for label, name, kw in plan_methods(plan):
        out["methods"].append(guarded(method_throughput, b, label, name, kw, plan, clock, method=label))
    natural = next((m for m in out["methods"] if m.get("method") == "natural" and "seconds" in m), None)
    for m in out["methods"]:
        if natural is not None and "seconds" in m:
            m["time_vs_natural"] = m["seconds"] / natural["seconds"]
    out["conadv_overlap"] = guarded(conadv_overlap, b, plan, clock)
    out["peak_memory_gb"] = peak_memory_gb(device)
    del b
    reset_peak_memory(device)
    return out


def method_throughput(b: Bench, label: str, name: str, kw: dict, plan: Plan, clock: Clock) -> dict:
    attack = attacks.create(name, **kw)
    ours = dat_ds_run(b, attack, label=label)
    runs = {"dat-ds": ours, "bare": bare_run(b, attack)}
    seconds = interleaved(clock, runs, plan, plan.steps)
    minibatches = plan.warmup + plan.rounds * plan.steps
    phases = {k: v / minibatches for k, v in b.timers[label].reset().items()}
    batch = b.spec.batch
    out = {"method": label, "seconds": seconds["dat-ds"], "bare_seconds": seconds["bare"],
           "images_per_s": batch / seconds["dat-ds"], "bare_images_per_s": batch / seconds["bare"],
           "ratio_to_bare": seconds["bare"] / seconds["dat-ds"],
           "updates_per_minibatch": attack.shape.updates_per_minibatch(attack),
           "phases_s": phases, **count_syncs(b, ours, plan.steps)}
    return out

