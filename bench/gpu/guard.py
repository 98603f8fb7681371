"""``guard``: the step guard's deferred agreement (decided on the device, read by the host one step
later: no host read per step) beside its synchronous one (one host read per optimizer step) and
no guard at all (no non-finite check), natural and PGD-3 training, interleaved, with the bare
loop as the reference; host reads per step of both agreements counted over real steps."""
from __future__ import annotations

import torch

from dat_ds import attacks

from .harness import (GUARD_ABLATION, METHODS, Bench, Clock, Plan, bare_run, build_bench, count_syncs, dat_ds_run,
                      guarded, interleaved)

MODES = {"deferred": "on", "synchronous": "off", "no guard": None}


def guard_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    spec = plan.models[0]
    b = build_bench(spec, plan, device)
    return {"model": spec.name, "batch": spec.batch, "dtype": plan.dtype or "float32",
            "methods": [guarded(guard_one, b, label, plan, clock, method=label) for label in GUARD_ABLATION]}


def guard_one(b: Bench, label: str, plan: Plan, clock: Clock) -> dict:
    name, kw = next((n, k) for m, n, k in METHODS if m == label)
    runs = {mode: dat_ds_run(b, attacks.create(name, **kw), label=f"{label}/{mode}", guard=defer)
            for mode, defer in MODES.items()}
    runs["bare"] = bare_run(b, attacks.create(name, **kw))
    seconds = interleaved(clock, runs, plan, plan.steps)
    out = {"method": label, "bare_images_per_s": b.spec.batch / seconds["bare"],
           "deferred_vs_synchronous": seconds["synchronous"] / seconds["deferred"]}
    for mode in MODES:
        key = mode.replace(" ", "_")
        out[f"{key}_images_per_s"] = b.spec.batch / seconds[mode]
        out[f"{key}_ratio_to_bare"] = seconds["bare"] / seconds[mode]
    for mode in ("deferred", "synchronous"):
        counted = count_syncs(b, runs[mode], plan.steps)
        out[f"{mode}_host_reads_per_step"] = counted["host_reads_per_step"]
        out[f"{mode}_syncs_per_step"] = counted["syncs_per_step"]
    return out
