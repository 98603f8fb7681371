"""One-command GPU check: the training step against a tuned PyTorch loop, the step guard, the batch
size, the codecs, nccl and LAMB on a CUDA device, in minutes.

One module per section in ``bench/gpu/`` (the section's name is its key in the results file):

* ``tuned`` (``gpu/tuned.py``): the anchor. A tuned loop (channels-last, bf16 autocast,
  torch.compile; same batch, attack and LAMB) beside the untuned bare loop and dat-ds run with
  ``--channels-last on --compile on``, per method: images/s, the ratio to the tuned loop, and
  model FLOPs utilisation (FLOPs counted with ``FlopCounterMode``, the bf16 peak by device name);
* ``throughput`` (``gpu/throughput.py``, ``gpu/conadv.py``): every method through
  ``dat_ds.trainer.train_epoch`` beside an untuned bare loop doing the same math; syncs and host
  reads per optimizer step, the phase split, and ConAdv's overlap;
* ``guard`` (``gpu/guard.py``): the step guard's deferred agreement beside its synchronous one and
  no guard (natural, PGD-3);
* ``sweep`` (``gpu/sweep.py``): ResNet-50 at micro-batches 128, 256, 512: images/s, peak memory;
* ``codec`` and ``powersgd`` (``gpu/codecs.py``): every compressor's encode + decode in GB/s
  beside a copy of the buffer; PowerSGD grouped by shape beside its per-tensor form;
* ``nccl`` (``gpu/nccl.py``): DAT steps with every compressor over the machine's GPUs;
* ``lamb`` (``gpu/lamb.py``): dat-ds's LAMB beside DeepSpeed's fused CUDA LAMB;
* ``memory``: peak device memory per section; ``trace`` (``gpu/trace.py``, with ``--trace``):
  profiled steps.

Shared parts (plan, clock, the dat-ds engine beside a bare loop) are in ``gpu/harness.py``. Each
section runs in its own ``try``: a failure is recorded in its place (``{"error": ...}``) and the
others still run; the results file is rewritten after every section. Timing: CUDA events around
whole runs of steps, the device synchronized only before a measured region (never inside a
step); medians over interleaved rounds. Without CUDA the script says so and exits 0;
``--device cpu --quick`` runs the same code on the CPU with a tiny model (fp32, gloo, world size
1, no fused LAMB, torch.compile with dynamo's ``eager`` backend), in seconds: not GPU figures.

    python bench/gpu_check.py                                   # CUDA: bench/results/gpu.json
    python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402
from gpu.codecs import codec_section, powersgd_section  # noqa: E402
from gpu.guard import guard_section  # noqa: E402
from gpu.harness import (GUARD_ABLATION, METHODS, Clock, Plan, guarded, make_plan, peak_memory_gb,  # noqa: E402,F401
                         reset_peak_memory)
from gpu.lamb import deepspeed_arch_list, lamb_section  # noqa: E402,F401
from gpu.nccl import nccl_section  # noqa: E402
from gpu.sweep import sweep_section  # noqa: E402
from gpu.throughput import throughput_section  # noqa: E402
from gpu.trace import trace_section  # noqa: E402
from gpu.tuned import tuned_section  # noqa: E402
from report_gpu import render_gpu  # noqa: E402

from dat_ds import compress, dist  # noqa: E402

# the sections in the order they run (the budget may stop the later ones); memory sums them up
SECTIONS = {"tuned": tuned_section, "throughput": throughput_section, "guard": guard_section,
            "sweep": sweep_section, "codec": codec_section, "powersgd": powersgd_section, "nccl": nccl_section,
            "lamb": lamb_section, "memory": None}


class Run:
    """Runs the sections in order within the time budget and rewrites the results after each."""

    def __init__(self, plan: Plan, device: torch.device, out: Optional[Path], quick: bool,
                 sections: Optional[List[str]] = None, trace_dir: Optional[Path] = None):
        self.plan, self.device, self.out, self.clock = plan, device, out, Clock(device)
        self.sections, self.trace_dir = sections or list(SECTIONS), trace_dir
        self.start = time.monotonic()
        self.data = {"title": "GPU check: the training step, codecs, nccl and LAMB on one machine",
                     "machine": machine(),
                     "settings": {"device": device.type, "quick": quick, "dtype": plan.dtype or "float32",
                                  "budget_s": plan.budget_s, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                                  "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
                                  "compile": compress.kernels.compile_mode(), "plan": asdict(plan),
                                  # dat-ds's runs: StepGuard(defer="auto"), on the device on CUDA where
                                  # the step allows it, on the host on the CPU
                                  "step_guard": "deferred" if device.type == "cuda" else "synchronous",
                                  "gpu_figures": device.type == "cuda"},
                     "sections": {}}

    def section(self, name: str, fn: Callable, *args) -> None:
        if name not in self.sections:
            return
        elapsed = time.monotonic() - self.start
        if elapsed > self.plan.budget_s:
            result = {"skipped": f"the time budget ({self.plan.budget_s:.0f} s) was spent after {elapsed:.0f} s"}
        else:
            print(f"gpu_check: {name} ...", flush=True)
            reset_peak_memory(self.device)
            t0 = time.monotonic()
            result = guarded(fn, *args)
            result["seconds"] = time.monotonic() - t0
            result.setdefault("peak_memory_gb", peak_memory_gb(self.device))
        self.data["sections"][name] = result
        self.save()

    def keep(self, path: Optional[Path]) -> None:
        """Start from the sections a results file at ``path`` holds (``--merge``): those this run
        measures are replaced, the others stay, each marked with the machine and date it came from."""
        if path is None or not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"gpu_check: --merge cannot read {path}: {err}")
        when = old.get("machine", {})
        for name, section in old.get("sections", {}).items():
            if name not in self.sections and name != "memory":
                section.setdefault("measured", {"date": when.get("date"), "gpu": when.get("gpu"),
                                                "torch": when.get("torch")})
                self.data["sections"][name] = section

    def memory(self) -> dict:
        peaks = {k: v["peak_memory_gb"] for k, v in self.data["sections"].items()
                 if v.get("peak_memory_gb") is not None and k != "throughput"}  # its models have their own
        for m in self.data["sections"].get("throughput", {}).get("models", []):
            if "peak_memory_gb" in m:
                peaks[f"throughput {m['model']}"] = m["peak_memory_gb"]
        total = torch.cuda.get_device_properties(self.device).total_memory / 1e9 if self.clock.cuda else None
        kind = "torch.cuda.max_memory_allocated" if self.clock.cuda else "peak RSS of the process, CPU"
        return {"kind": kind, "peak_gb": max(peaks.values()), "per_section_gb": peaks, "device_total_gb": total}

    def save(self) -> None:
        self.data["wall_s"] = time.monotonic() - self.start
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.data, indent=2) + "\n")

    def all(self) -> dict:
        plan, device, clock = self.plan, self.device, self.clock
        for name, fn in SECTIONS.items():
            if name == "nccl":
                self.section(name, fn, plan, device, clock, self.start + plan.budget_s + 60)
            elif fn is not None:
                self.section(name, fn, plan, device, clock)
        if self.trace_dir is not None:
            self.sections = [*self.sections, "trace"]
            self.section("trace", trace_section, plan, device, clock, self.trace_dir)
        if "memory" in self.sections:
            self.data["sections"]["memory"] = guarded(self.memory)
        self.data["machine"] = machine()  # the load average at the end
        self.save()
        return self.data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: checks the code paths, in seconds")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default: bench/results/gpu.json on CUDA; a CPU run writes one only if given)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="SECTION",
                   help=f"run only these ({' '.join(SECTIONS)}; default: all)")
    p.add_argument("--trace", type=Path, default=None, metavar="DIR",
                   help="also profile a few natural, PGD-3 and ConAdv steps (dat-ds with its step guard, the guard's "
                        "synchronous agreement and no guard, "
                        "the bare loop): the device's busy share, the host's costliest operators, gzipped Chrome "
                        "traces in DIR")
    p.add_argument("--methods", nargs="+", choices=[label for label, _, _ in METHODS], default=None, metavar="METHOD",
                   help="time only these methods in tuned and throughput (default: all: "
                        f"{' '.join(label for label, _, _ in METHODS)})")
    p.add_argument("--merge", action="store_true",
                   help="keep the sections of the results file that this run does not measure, each marked with "
                        "the date and machine it was measured on")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no section starts after this many seconds (default: 480 on CUDA, 180 with --quick)")
    args = p.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        print(f"gpu_check: --budget-s must be positive, got {args.budget_s:g}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine, nothing measured "
              "(`python bench/gpu_check.py --device cpu --quick` runs the same code on the CPU)")
        return 0
    if args.device == "cpu" and not args.quick:
        print("gpu_check: --device cpu needs --quick (the full sizes take hours on a CPU)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported; spawned ranks inherit it
    out = args.out or (RESULTS / "gpu.json" if args.device == "cuda" else None)
    dist.init()
    device = dist.device()
    plan = make_plan(device, args.quick)
    if args.budget_s is not None:
        plan.budget_s = args.budget_s
    if args.methods:
        plan.methods = tuple(args.methods)
    run = Run(plan, device, out, args.quick, args.sections, args.trace)
    if args.merge:
        run.keep(out)
    data = run.all()
    print(render_gpu("gpu", data))
    print(f"written: {out}" if out else "(a CPU run: not written; --out PATH keeps it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
