"""One-command GPU check: the training step, the codecs, nccl and LAMB on a CUDA device, in minutes.

Writes ``bench/results/gpu.json`` (rendered by ``bench/report.py``) with one section each:

* ``throughput``: images/s of natural, FGSM-RS, PGD-3, PGD-10, Free-4 and ConAdv training through
  ``dat_ds.trainer.train_epoch`` (DeepSpeed engine, dat-ds LAMB, step guard, bf16 autocast on
  CUDA), beside a bare PyTorch loop doing the same math with the same optimizer, interleaved;
  timm ``resnet50`` at 224 px and ``preactresnet18`` at 32 px. Per method: device synchronizes
  and host reads per optimizer step (:class:`dat_ds.syncs.SyncCounter`, the counter of the
  sync-budget test), the phase split of dat-ds's own timers, and ConAdv's overlap: the share of
  the attack's time hidden behind the update, ``(attack alone + update alone - ConAdv step) /
  attack alone``, all three measured side by side;
* ``codec``: every compressor's encode + decode (``all_reduce_flat_`` at world size 1, what a
  training step runs) on the device, GB/s of fp32 gradient beside a plain copy of the buffer;
* ``nccl``: DAT steps (PGD) with every compressor over the process group of the machine's GPUs
  (nccl; one GPU is world size 1), ranks spawned by ``torch.multiprocessing``: seconds per step,
  bytes sent, and whether every rank ends with bit-identical weights;
* ``lamb``: dat-ds's LAMB step beside DeepSpeed's fused CUDA LAMB (``FusedLamb``, what
  ``"optimizer": {"type": "Lamb"}`` selects in plain DeepSpeed) on the same model, and one step's
  parameter delta compared: with matched settings (no bias correction, no trust-ratio clamp),
  where the formulas agree, and with each optimizer's defaults; both also against a PyTorch
  transcription of the fused kernel's formula, which runs on the CPU too;
* ``memory``: peak device memory per section (``torch.cuda.max_memory_allocated``).

Each section runs in its own ``try``: a failure is recorded in its place (``{"error": ...}``) and
the others still run; the results file is rewritten after every section. Timing: CUDA events
around whole runs of steps, the device synchronized only before a measured region (never inside
a step); medians over interleaved rounds. Without CUDA the script says so and exits 0;
``--device cpu --quick`` runs the same code on the CPU with a tiny model (fp32, gloo, world size
1, no fused LAMB), in seconds.

    python bench/gpu_check.py                                   # CUDA: bench/results/gpu.json
    python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import queue as queue_lib
import resource
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402
from step_cost import _eval_mode, bare_pgd  # noqa: E402

from dat_ds import attacks, compress, dist  # noqa: E402
from dat_ds.guard import StepGuard  # noqa: E402
from dat_ds.models import create_model  # noqa: E402
from dat_ds.optim import Lamb, param_groups  # noqa: E402
from dat_ds.syncs import SyncCounter  # noqa: E402
from dat_ds.timing import Timers  # noqa: E402
from dat_ds.trainer import train_epoch  # noqa: E402

EPS = 8 / 255
LR, WEIGHT_DECAY = 1e-3, 5e-5
NO_CLAMP = 1e30  # a trust-ratio bound that never binds (JSON has no infinity)
METHODS = [("natural", "none", {}), ("fgsm_rs", "fgsm_rs", {"eps": EPS}),
           ("pgd-3", "pgd", {"eps": EPS, "steps": 3, "alpha": 2.5 * EPS / 3}),
           ("pgd-10", "pgd", {"eps": EPS, "steps": 10, "alpha": 2.5 * EPS / 10}),
           ("free-4", "free", {"eps": EPS, "steps": 4}), ("conadv", "conadv", {"eps": EPS})]
SECTIONS = ["throughput", "codec", "nccl", "lamb", "memory"]
# methods also timed with the step guard's synchronous agreement (one host read per optimizer
# step) and without the guard: what the guard costs, and what deferring its agreement saves
GUARD_ABLATION = ("natural", "pgd-3")


@dataclass
class ModelSpec:
    name: str
    img_size: int
    batch: int
    stem: str = "auto"


@dataclass
class Plan:
    """Sizes of one run: ``full`` fits a CUDA device in minutes, ``quick`` a CPU in seconds."""
    models: List[ModelSpec]
    dist_model: ModelSpec  # also the codec's gradient layout and the LAMB comparison's model
    dtype: Optional[str]  # torch_autocast dtype; None: fp32
    steps: int = 6  # minibatches per timed run (one train_epoch)
    overlap_steps: int = 10  # ConAdv: the first attack and the last update of an epoch overlap nothing
    rounds: int = 3  # interleaved timed runs per implementation (median)
    warmup: int = 2
    codec_repeats: int = 10
    dist_steps: int = 20
    dist_pgd_steps: int = 3
    budget_s: float = 360.0  # no section starts after this; the whole check stays under 8 minutes


def make_plan(device: torch.device, quick: bool) -> Plan:
    dtype = "bfloat16" if device.type == "cuda" else None
    if quick:
        tiny = ModelSpec("test_resnet", 16, 4, "native")
        return Plan([tiny], tiny, dtype, steps=2, overlap_steps=2, rounds=1, warmup=1, codec_repeats=3, dist_steps=3,
                    dist_pgd_steps=1, budget_s=120.0)
    resnet50 = ModelSpec("resnet50", 224, 128, "native")
    return Plan([resnet50, ModelSpec("preactresnet18", 32, 256)], ModelSpec("resnet50", 224, 64, "native"), dtype)


# -- timing ------------------------------------------------------------------------------------
class Clock:
    """Seconds of work on ``device``: CUDA events on the current stream (the device is synchronized
    before a measured region starts and waited for once at its end, never inside), wall time on
    the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def each(self, fn: Callable[[], object], repeats: int, prepare: Optional[Callable[[], object]] = None) -> float:
        """Median seconds of one ``fn()`` call; ``prepare()`` runs before each call, untimed."""
        if not self.cuda:
            samples = []
            for _ in range(repeats):
                if prepare is not None:
                    prepare()
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)
        torch.cuda.synchronize()
        pairs = []
        for _ in range(repeats):
            if prepare is not None:
                prepare()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        pairs[-1][1].synchronize()
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs)


def interleaved(clock: Clock, runs: Dict[str, Callable[[int], object]], plan: Plan, steps: int) -> Dict[str, float]:
    """Median seconds per minibatch of each ``run(steps)`` (one epoch of that many minibatches), timed
    A B A B ... so that drift (clocks, temperature) hits every implementation alike."""
    for run in runs.values():
        run(plan.warmup)
    samples = {k: [] for k in runs}
    for _ in range(plan.rounds):
        for k, run in runs.items():
            samples[k].append(clock.time(lambda: run(steps)) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the last reset: the device's allocator on CUDA, the process's RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- one model on the device: the dat-ds engine and a bare copy ----------------------------------
def ds_config(batch: int, dtype: Optional[str]) -> dict:
    # gradient_clipping 0 as in every shipped config (DeepSpeed's default, 1.0, would clip: other math)
    cfg = {"train_micro_batch_size_per_gpu": batch, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
           "optimizer": {"type": "Lamb", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}}}
    if dtype:
        cfg["torch_autocast"] = {"enabled": True, "dtype": dtype}
    return cfg


@dataclass
class Bench:
    """A model as dat-ds trains it (``engine``) and as a bare loop does (``bare``), one batch."""
    spec: ModelSpec
    engine: object
    bare: torch.nn.Module
    bare_opt: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    dtype: Optional[str]
    timers: Dict[str, Timers] = field(default_factory=dict)

    def autocast(self):
        if not self.dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.x.device.type, dtype=getattr(torch, self.dtype))


def build_bench(spec: ModelSpec, plan: Plan, device: torch.device, seed: int = 0) -> Bench:
    from dat_ds.engine import initialize
    torch.manual_seed(0)  # the same weights on every rank
    model = create_model(spec.name, 10, 3, spec.img_size, stem=spec.stem)
    bare = copy.deepcopy(model).to(device)
    engine = initialize(model, ds_config(spec.batch, plan.dtype), steps_per_epoch=1000, epochs=1)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(spec.batch, 3, spec.img_size, spec.img_size, generator=g).to(device)
    y = torch.randint(0, 10, (spec.batch,), generator=g).to(device)
    return Bench(spec, engine, bare, Lamb(param_groups(bare, WEIGHT_DECAY), lr=LR), x, y, plan.dtype)


def dat_ds_run(b: Bench, attack, compressor=None, label: str = "", guard: Optional[str] = "auto"
               ) -> Callable[[int], dict]:
    """``run(n)``: one ``train_epoch`` over n minibatches, as a training run makes them (guard on,
    phase timers on the device's clock; the timers are read after the measurement). ``guard``: the
    step guard's ``defer`` mode ("auto" as a run takes it, "off" its synchronous agreement), None
    drops the guard (no non-finite check, nothing read per step): what the guard costs."""
    guard = StepGuard(b.engine, defer=guard) if guard else None
    compressor = compressor or compress.create("none")
    timers = b.timers.setdefault(label, Timers(b.engine.device))
    return lambda n: train_epoch(b.engine, [(b.x, b.y)] * n, attack, compressor, timers, guard=guard)


def bare_run(b: Bench, attack) -> Callable[[int], None]:
    """``run(n)``: n minibatches of the same math in a plain PyTorch loop (attack, loss, backward, LAMB)."""
    model, opt, x, y = b.bare, b.bare_opt, b.x, b.y
    if isinstance(attack, attacks.Free):
        return _bare_free(b, attack)
    if isinstance(attack, attacks.ConAdv):
        stale = copy.deepcopy(model)

        def perturb():  # weights of the previous update, attacked in sequence
            torch._foreach_copy_([t.data for t in (*stale.parameters(), *stale.buffers())],
                                 [t.data for t in (*model.parameters(), *model.buffers())])
            return _eval_mode(stale, bare_pgd, x, y, attack.eps, attack.alpha, attack.steps)
    elif isinstance(attack, attacks.NoAttack):
        def perturb():
            return x
    else:
        def perturb():
            return _eval_mode(model, bare_pgd, x, y, attack.eps, attack.alpha, attack.steps)

    def run(n):
        for _ in range(n):
            model.train()
            with b.autocast():
                x_adv = perturb()
                loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def _bare_free(b: Bench, attack) -> Callable[[int], None]:
    model, opt, x, y = b.bare, b.bare_opt, b.x, b.y
    delta = torch.zeros_like(x)

    def run(n):
        for _ in range(n):
            model.train()
            for _ in range(attack.steps):  # one backward per replay: weight and input gradients
                x_adv = (x + delta).clamp(0, 1).requires_grad_(True)
                with b.autocast():
                    loss = F.cross_entropy(model(x_adv), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                delta.add_(x_adv.grad.sign(), alpha=attack.alpha).clamp_(-attack.eps, attack.eps)
    return run


def count_syncs(b: Bench, run: Callable[[int], dict], n: int) -> dict:
    """Device synchronizes and host reads per optimizer step over ``n`` minibatches of ``run``."""
    before = b.engine.global_steps
    with SyncCounter() as counter:
        run(n)
    steps = max(b.engine.global_steps - before, 1)
    return {"syncs_per_step": counter.counts["sync"] / steps,
            "host_reads_per_step": counter.counts["host_read"] / steps, "counted_steps": steps}


# -- sections ------------------------------------------------------------------------------------
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
    for label, name, kw in METHODS:
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
    if label in GUARD_ABLATION:
        runs["sync guard"] = dat_ds_run(b, attacks.create(name, **kw), label=f"{label}/sync guard", guard="off")
        runs["no guard"] = dat_ds_run(b, attacks.create(name, **kw), label=f"{label}/no guard", guard=None)
    seconds = interleaved(clock, runs, plan, plan.steps)
    minibatches = plan.warmup + plan.rounds * plan.steps
    phases = {k: v / minibatches for k, v in b.timers[label].reset().items()}
    batch = b.spec.batch
    out = {"method": label, "seconds": seconds["dat-ds"], "bare_seconds": seconds["bare"],
           "images_per_s": batch / seconds["dat-ds"], "bare_images_per_s": batch / seconds["bare"],
           "ratio_to_bare": seconds["bare"] / seconds["dat-ds"],
           "updates_per_minibatch": attack.shape.updates_per_minibatch(attack),
           "phases_s": phases, **count_syncs(b, ours, plan.steps)}
    for key in ("sync guard", "no guard"):
        if key in seconds:
            field = key.replace(" ", "_")
            out[f"{field}_images_per_s"] = batch / seconds[key]
            out[f"{field}_ratio_to_bare"] = seconds["bare"] / seconds[key]
    return out


def conadv_overlap(b: Bench, plan: Plan, clock: Clock) -> dict:
    """ConAdv's training step against its two parts run alone: the attack (``launch`` +
    ``collect`` of a separate instance: snapshot and PGD, nothing beside it) and a natural update."""
    kw = dict(next(kw for _, name, kw in METHODS if name == "conadv"))
    alone = attacks.create("conadv", **kw)

    def attack_alone(n):
        with b.autocast():
            for _ in range(n):
                alone.collect(alone.launch(b.engine.module, b.x, b.y))
    runs = {"conadv": dat_ds_run(b, attacks.create("conadv", **kw), label="overlap-conadv"),
            "update": dat_ds_run(b, attacks.create("none"), label="overlap-update"), "attack": attack_alone}
    s = interleaved(clock, runs, plan, plan.overlap_steps)
    hidden = s["attack"] + s["update"] - s["conadv"]
    return {"attack_s": s["attack"], "update_s": s["update"], "conadv_s": s["conadv"], "hidden_s": hidden,
            "overlap": hidden / s["attack"], "side_stream": clock.cuda}


def codec_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    """Encode + decode of every compressor at world size 1 on the device, against a plain copy."""
    shapes = [p.shape for p in create_model(plan.dist_model.name, 10, 3, plan.dist_model.img_size,
                                            stem=plan.dist_model.stem).parameters()]
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


def nccl_section(plan: Plan, device: torch.device, clock: Clock, deadline: float) -> dict:
    """``plan.dist_steps`` DAT steps per compressor on ranks spawned over the machine's GPUs; a
    rendezvous port taken by another process between its choice and its use is chosen anew."""
    for attempt in range(3):
        try:
            return _spawned_steps(plan, device, deadline)
        except RuntimeError as err:
            if "EADDRINUSE" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _spawned_steps(plan: Plan, device: torch.device, deadline: float) -> dict:
    import torch.multiprocessing as mp
    world = torch.cuda.device_count() if device.type == "cuda" else 1
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(rank_main, args=(world, dist.free_port(), asdict(plan), results), nprocs=world,
                               join=False, start_method="spawn")
    per_rank = {}
    try:
        while len(per_rank) < world and time.monotonic() < deadline:
            try:
                rank, payload = results.get(timeout=5)
                per_rank[rank] = payload
            except queue_lib.Empty:
                if procs.join(timeout=0):  # all exited (raises if one died)
                    break
    finally:
        for p in procs.processes:
            p.join(timeout=30 if len(per_rank) == world else 0)
            if p.is_alive():  # a rank that outlived the budget or waits on a dead peer
                p.kill()
    if len(per_rank) < world:
        raise RuntimeError(f"{world - len(per_rank)} of {world} ranks reported nothing (time budget or a crash)")
    errors = [p["error"] for p in per_rank.values() if "error" in p]
    if errors:
        raise RuntimeError(errors[0])
    return per_rank[0]


def rank_main(rank: int, world: int, port: int, plan: dict, results) -> None:
    """One rank of the nccl section (a spawned process): reports its result or its error."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init()
        results.put((rank, dat_steps(_plan_from(plan))))
    except Exception as err:  # the parent records it: one rank's failure must not hang the others' report
        results.put((rank, {"error": _describe(err)}))


def dat_steps(plan: Plan) -> dict:
    import torch.distributed as tdist
    device = dist.device()
    clock = Clock(device)
    reset_peak_memory(device)
    b = build_bench(plan.dist_model, plan, device, seed=1 + dist.rank())  # other data on every rank
    attack = attacks.create("pgd", eps=EPS, steps=plan.dist_pgd_steps, alpha=2.5 * EPS / plan.dist_pgd_steps)
    out = {"backend": tdist.get_backend(), "world_size": dist.world_size(), "model": plan.dist_model.name,
           "batch_per_rank": plan.dist_model.batch, "pgd_steps": plan.dist_pgd_steps, "steps": plan.dist_steps,
           "compressors": []}
    for name in compress.names():
        out["compressors"].append(guarded(dat_steps_one, b, name, attack, plan, clock, compressor=name))
    none = next((c for c in out["compressors"] if c.get("compressor") == "none" and "s_per_step" in c), None)
    for c in out["compressors"]:
        if none is not None and "s_per_step" in c:
            c["time_vs_none"] = c["s_per_step"] / none["s_per_step"]
    out["peak_memory_gb"] = peak_memory_gb(device)
    return out


def dat_steps_one(b: Bench, name: str, attack, plan: Plan, clock: Clock) -> dict:
    run = dat_ds_run(b, attack, compress.create(name), label=f"dist-{name}")
    run(1)  # first exchange: buffers, compiled kernels, communicator set-up
    b.timers[f"dist-{name}"].reset()
    result = {}
    seconds = clock.time(lambda: result.update(run(plan.dist_steps)))
    phases = b.timers[f"dist-{name}"].reset()
    compute = sum(v for k, v in phases.items() if k != "comm")
    digest = torch.stack([torch.cat([p.detach().reshape(-1).double() for p in b.engine.module.parameters()]).sum(),
                          *(p.detach().double().abs().sum() for p in b.engine.module.parameters())])
    digests = dist.all_gather_object(digest.cpu().tolist())
    return {"compressor": name, "s_per_step": seconds / plan.dist_steps, "loss": result["train_loss"],
            "finite": math.isfinite(result["train_loss"]), "bytes_per_step": result["bytes_sent"] / plan.dist_steps,
            "comm_share": phases.get("comm", 0.0) / max(compute + phases.get("comm", 0.0), 1e-12),
            "identical_across_ranks": all(d == digests[0] for d in digests)}


def lamb_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    """dat-ds's LAMB beside DeepSpeed's fused CUDA LAMB: step time, and one step's parameter delta."""
    spec = plan.dist_model
    torch.manual_seed(0)
    model = create_model(spec.name, 10, 3, spec.img_size, stem=spec.stem).to(device)
    g = torch.Generator().manual_seed(1)
    grads = [(torch.randn(p.shape, generator=g) * 1e-2).to(device) for p in model.parameters()]
    settings = lamb_settings()
    out = {"model": spec.name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "settings": settings}
    ours = {k: lambda m, s=s: Lamb(param_groups(m, WEIGHT_DECAY), **s["ours"]) for k, s in settings.items()}
    out["ours_ms"] = 1e3 * step_seconds(model, grads, ours["defaults"], plan, clock)
    for k, s in settings.items():  # the fused kernel's formula, transcribed: runs anywhere
        delta = one_step(model, grads, ours[k])
        out[f"ours_vs_formula_{k}"] = compare(delta, formula_delta(model, grads, **s["fused"]), model.parameters())
    out["fused"] = guarded(fused_lamb, model, grads, ours, settings, plan, clock, device)
    if "ms" in out["fused"]:
        out["fused_speedup"] = out["ours_ms"] / out["fused"]["ms"]
    return out


def lamb_settings() -> dict:
    """The two optimizers' settings: ``matched`` (no bias correction, no clamp: one formula) and
    ``defaults`` (dat-ds's shipped ds_config values; FusedLamb's own clamp of the trust ratio)."""
    common = {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-6}
    return {"matched": {"ours": {**common, "bias_correction": False, "c_l": 0.0, "c_u": NO_CLAMP},
                        "fused": {**common, "bias_correction": False, "max_coeff": NO_CLAMP, "min_coeff": 0.0}},
            "defaults": {"ours": {**common, "bias_correction": True, "c_l": 0.0, "c_u": 10.0},
                         "fused": {**common, "bias_correction": True, "max_coeff": 10.0, "min_coeff": 0.01}}}


def fused_lamb(model, grads, ours: dict, settings: dict, plan: Plan, clock: Clock, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "DeepSpeed's FusedLamb is a CUDA kernel (no CPU build)"}
    from deepspeed.ops.lamb import FusedLamb
    out = {}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch and arch != deepspeed_arch_list(arch):
        # DeepSpeed's JIT builder reads "9.0" but not torch's arch-specific "9.0a" (int("0a") fails)
        out["arch_list"] = {"env": arch, "build": deepspeed_arch_list(arch)}
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(arch)
    t0 = time.perf_counter()
    try:
        FusedLamb([torch.zeros(1, device=device, requires_grad=True)])  # builds (JIT) or loads the op
    finally:
        if arch is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    out["load_s"] = time.perf_counter() - t0
    fused = {k: lambda m, s=s: FusedLamb(param_groups(m, WEIGHT_DECAY), **s["fused"]) for k, s in settings.items()}
    out["ms"] = 1e3 * step_seconds(model, grads, fused["defaults"], plan, clock)
    for k, s in settings.items():
        delta = one_step(model, grads, fused[k])
        out[f"vs_ours_{k}"] = compare(one_step(model, grads, ours[k]), delta, model.parameters())
        out[f"vs_formula_{k}"] = compare(formula_delta(model, grads, **s["fused"]), delta, model.parameters())
    return out


def deepspeed_arch_list(arch: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed's JIT builder parses it: "8.0;9.0a+PTX" -> "8.0;9.0+PTX"."""
    out = []
    for cc in arch.replace(" ", ";").split(";"):
        if cc.strip():
            base, plus, ptx = cc.strip().partition("+")
            major, _, minor = base.partition(".")
            digits = "".join(ch for ch in minor if ch.isdigit()) or "0"
            cc = f"{major}.{digits}{plus}{ptx}"
            if cc not in out:
                out.append(cc)
    return ";".join(out)


def step_seconds(model, grads, make_opt, plan: Plan, clock: Clock) -> float:
    clone = _with_grads(model, grads)
    opt = make_opt(clone)
    for _ in range(plan.warmup):
        opt.step()
    return clock.each(opt.step, plan.codec_repeats)


def one_step(model, grads, make_opt) -> List[torch.Tensor]:
    """The parameter change of one optimizer step from a fresh state."""
    clone = _with_grads(model, grads)
    make_opt(clone).step()
    return [(p.detach() - q.detach()).float() for p, q in zip(clone.parameters(), model.parameters())]


def _with_grads(model, grads) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    for p, g in zip(clone.parameters(), grads):
        p.grad = g.clone()
    return clone


def formula_delta(model, grads, lr, betas, eps, bias_correction, max_coeff, min_coeff) -> List[torch.Tensor]:
    """One step of DeepSpeed's fused LAMB kernel from a zero state, in PyTorch: ``u = m / (sqrt(v) +
    eps) + wd p`` with uncorrected moments, ``coeff = clamp(|p| / |u|, min_coeff, max_coeff)`` (1 when
    either norm is 0), ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * coeff * u``."""
    b1, b2 = betas
    decay = {id(p): group["weight_decay"] for group in param_groups(model, WEIGHT_DECAY) for p in group["params"]}
    step = lr * math.sqrt(1 - b2) / (1 - b1) if bias_correction else lr
    out = []
    for param, g in zip(model.parameters(), grads):
        p, g = param.detach().float(), g.float()
        u = (1 - b1) * g / (((1 - b2) * g * g).sqrt() + eps) + decay.get(id(param), 0.0) * p
        w_norm, u_norm = p.norm(), u.norm()
        coeff = (w_norm / u_norm).clamp(min_coeff, max_coeff) if w_norm > 0 and u_norm > 0 else torch.ones(())
        out.append((p - step * coeff * u) - p)  # rounded through the fp32 weights, as a measured delta is
    return out


def compare(a: List[torch.Tensor], b: List[torch.Tensor], params) -> dict:
    """How far update ``b`` is from update ``a`` (deltas of ``params``): largest difference relative to
    ``a``'s largest entry, norm ratio, cosine. ``same``: every difference within what fp32 explains,
    2 units in the last place of the weight (a delta is measured through the rounded new weight)
    plus 1e-4 of the update (norms reduced in another order)."""
    fa, fb = torch.cat([t.reshape(-1) for t in a]).double(), torch.cat([t.reshape(-1) for t in b]).double()
    w = torch.cat([p.detach().reshape(-1) for p in params]).double().abs()
    diff = (fa - fb).abs()
    allowed = 2 * torch.finfo(torch.float32).eps * w + 1e-4 * fa.abs()
    return {"rel_max_diff": (diff.max() / fa.abs().max().clamp_min(1e-30)).item(),
            "norm_ratio": (fb.norm() / fa.norm().clamp_min(1e-30)).item(),
            "cosine": F.cosine_similarity(fa, fb, dim=0).item(), "same": bool((diff <= allowed).all())}


# -- running the sections ------------------------------------------------------------------------
def trace_section(plan: Plan, device: torch.device, clock: Clock, trace_dir: Path) -> dict:
    """A few natural, PGD-3 and ConAdv steps of dat-ds (its guard as a run takes it, synchronous, none)
    and of the bare loop under the
    PyTorch profiler: the device's busy share of the wall time and the host's costliest operators,
    with a gzipped Chrome trace of each in ``trace_dir``."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile
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


def guarded(fn: Callable, *args, **label) -> dict:
    """``{**label, **fn(*args)}``, or ``{**label, "error": ...}`` naming what failed: one failure
    must not lose the rest."""
    try:
        return {**label, **fn(*args)}
    except Exception as err:
        traceback.print_exc()
        return {**label, "error": _describe(err)}


def _describe(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}{at}"


def _plan_from(d: dict) -> Plan:
    return Plan(**{**d, "models": [ModelSpec(**m) for m in d["models"]], "dist_model": ModelSpec(**d["dist_model"])})


class Run:
    """Runs the sections in order within the time budget and rewrites the results after each."""

    def __init__(self, plan: Plan, device: torch.device, out: Optional[Path], quick: bool,
                 sections: Optional[List[str]] = None, trace_dir: Optional[Path] = None):
        self.plan, self.device, self.out, self.clock = plan, device, out, Clock(device)
        self.sections, self.trace_dir = sections or SECTIONS, trace_dir
        self.start = time.monotonic()
        self.data = {"title": "GPU check: the training step, codecs, nccl and LAMB on one machine",
                     "machine": machine(),
                     "settings": {"device": device.type, "quick": quick, "dtype": plan.dtype or "float32",
                                  "budget_s": plan.budget_s, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                                  "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
                                  "compile": compress.kernels.compile_mode(), "plan": asdict(plan),
                                  # dat-ds's runs: StepGuard(defer="auto"), on the device on CUDA where
                                  # the step allows it, on the host on the CPU
                                  "step_guard": "deferred" if device.type == "cuda" else "synchronous"},
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
        self.section("throughput", throughput_section, plan, device, clock)
        self.section("codec", codec_section, plan, device, clock)
        self.section("nccl", nccl_section, plan, device, clock, self.start + plan.budget_s + 60)
        self.section("lamb", lamb_section, plan, device, clock)
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
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, metavar="SECTION",
                   help=f"run only these ({' '.join(SECTIONS)}; default: all)")
    p.add_argument("--trace", type=Path, default=None, metavar="DIR",
                   help="also profile a few natural, PGD-3 and ConAdv steps (dat-ds with its step guard, the guard's "
                        "synchronous agreement and no guard, "
                        "the bare loop): the device's busy share, the host's costliest operators, gzipped Chrome "
                        "traces in DIR")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no section starts after this many seconds (default: 360 on CUDA, 120 with --quick)")
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
    data = Run(plan, device, out, args.quick, args.sections, args.trace).all()
    from report_gpu import render_gpu
    print(render_gpu("gpu", data))
    print(f"written: {out}" if out else "(a CPU run: not written; --out PATH keeps it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
