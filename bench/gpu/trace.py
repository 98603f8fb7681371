"""``trace`` (``--trace DIR``): a few natural, PGD-3 and ConAdv steps of dat-ds (its guard as a
run takes it, synchronous, none) and of the bare loop under the PyTorch profiler: the device's
busy share of the wall time and the host's costliest operators, with a gzipped Chrome trace of
each in DIR."""
from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dat_ds import attacks

from .harness import METHODS, Clock, Plan, bare_run, build_bench, dat_ds_run, guarded


def trace_section(plan: Plan, device: torch.device, clock: Clock, trace_dir: Path) -> dict:
    """A few natural, PGD-3 and ConAdv steps of dat-ds (its guard as a run takes it, synchronous, none)
    and of the bare loop under the
    PyTorch profiler: the device's busy share of the wall time and the host's costliest operators,
    with a gzipped Chrome trace of each in ``trace_dir``."""
    b = build_bench(plan.models[0], plan, device)
    trace_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    out = {"model": b.spec.name, "batch": b.spec.batch, "runs": []}
    for method in ("natural", "pgd-3", "conadv"):
        name, kw = next((n, k) for label, n, k in METHODS if label == method)
        runs = {"dat-ds": dat_ds_run(b, attacks.create(name, **kw), label=f"trace {method}"),
                "dat-ds sync guard": dat_ds_run(b, attacks.create(name, **kw), label=f"trace {method} sg",
                                                guard="off"),
                "dat-ds no guard": dat_ds_run(b, attacks.create(name, **kw), label=f"trace {method} ng", guard=None),
                "bare": bare_run(b, attacks.create(name, **kw))}
        for impl, run in runs.items():
            run(plan.warmup)
            if clock.cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                run(plan.steps)
                if clock.cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            stem = f"{method}_{impl.replace(' ', '_')}"
            prof.export_chrome_trace(str(trace_dir / f"{stem}.json"))
            with open(trace_dir / f"{stem}.json", "rb") as src, gzip.open(trace_dir / f"{stem}.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (trace_dir / f"{stem}.json").unlink()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            (trace_dir / f"{stem}.txt").write_text(table + "\n")
            out["runs"].append({"method": method, "impl": impl, "wall_s_per_step": wall / plan.steps,
                                "device_busy": guarded(_busy_share, prof, wall) if clock.cuda else None})
    return out


def _busy_share(prof, wall: float) -> float:
    """Share of ``wall`` in which at least one kernel or copy ran on the device (union of intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"))
    busy, end = 0.0, float("-inf")
    for a, z in spans:
        if z > end:
            busy += z - max(a, end)
            end = z
    return {"share": busy / 1e6 / wall, "device_events": len(spans)}  # time ranges are in microseconds

