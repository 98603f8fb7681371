"""``tuned``: the anchor. A tuned PyTorch loop (channels-last weights and batch, bf16 autocast,
``torch.compile``; the same batch, attack and LAMB) beside the untuned bare loop (kept as a row)
and dat-ds run as a tuned run runs (``--channels-last on --compile on``), per method, interleaved:
images/s, dat-ds's ratio to the tuned loop, and model FLOPs utilisation, images/s x FLOPs per
image / the device's dense bf16 peak. FLOPs per image are counted over one minibatch of the
method (attack and update, forward and backward) with ``torch.utils.flop_counter.FlopCounterMode``;
the peak comes from :data:`BF16_PEAK_TFLOPS` by device name (None on the CPU or an unknown GPU).
A CPU ``--quick`` run compiles with dynamo's ``eager`` backend (graph capture, no code
generation) on a tiny model: it checks the code paths; its figures are not GPU figures."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from dat_ds import attacks

from .harness import Bench, Clock, Plan, bare_run, build_bench, dat_ds_run, guarded, interleaved, plan_methods

# dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, by a name fragment of
# torch.cuda.get_device_name(); the first fragment found in the name wins (H100 PCIe before H100)
BF16_PEAK_TFLOPS = [("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0)]


def bf16_peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in BF16_PEAK_TFLOPS if fragment in name), None)


def flops_per_image(b: Bench, attack) -> float:
    """FLOPs of one minibatch of the bare loop (attack, forward, backward), per image."""
    run = bare_run(b, attack)
    with FlopCounterMode(display=False) as counter:
        run(1)
    return counter.get_total_flops() / b.spec.batch


def tuned_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    spec = plan.models[0]
    untuned, tuned = build_bench(spec, plan, device), build_bench(spec, plan, device, tuned=True)
    peak = bf16_peak_flops(device)
    out = {"model": spec.name, "img_size": spec.img_size, "batch": spec.batch, "dtype": plan.dtype or "float32",
           "compile_backend": plan.compile_backend, "peak_tflops": peak / 1e12 if peak else None,
           "gpu_figure": device.type == "cuda", "methods": [],
           "anchor_attack": "frozen weights"}  # the loops' attacks: harness.frozen_attack
    for label, name, kw in plan_methods(plan):
        out["methods"].append(guarded(tuned_one, untuned, tuned, name, kw, plan, clock, peak, method=label))
    return out


def tuned_one(untuned: Bench, tuned: Bench, name: str, kw: dict, plan: Plan, clock: Clock,
              peak: Optional[float]) -> dict:
    runs = {"untuned": bare_run(untuned, attacks.create(name, **kw)),
            "tuned": bare_run(tuned, attacks.create(name, **kw)),
            "dat-ds": dat_ds_run(tuned, attacks.create(name, **kw), label=f"tuned/{name}")}
    seconds = interleaved(clock, runs, plan, plan.steps)
    flops = flops_per_image(untuned, attacks.create(name, **kw))
    out = {"gflops_per_image": flops / 1e9, "ratio_to_tuned": seconds["tuned"] / seconds["dat-ds"],
           "untuned_ratio_to_tuned": seconds["tuned"] / seconds["untuned"]}
    for key, s in seconds.items():
        field = key.replace("-", "_")
        out[f"{field}_images_per_s"] = tuned.spec.batch / s
        out[f"{field}_mfu"] = tuned.spec.batch / s * flops / peak if peak else None
    return out
