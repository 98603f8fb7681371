"""What every section of the GPU check shares: the plan (sizes), the clock, a model as dat-ds
trains it beside a bare PyTorch loop doing the same math, and ``guarded`` (a failure recorded in
its place, the other parts still run)."""
from __future__ import annotations

import contextlib
import copy
import gc
import resource
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from step_cost import bare_pgd

from dat_ds import attacks, compress, speed
from dat_ds.guard import StepGuard
from dat_ds.models import create_model
from dat_ds.optim import Lamb, param_groups
from dat_ds.syncs import SyncCounter
from dat_ds.timing import Timers
from dat_ds.trainer import train_epoch

EPS = 8 / 255
LR, WEIGHT_DECAY = 1e-3, 5e-5
NO_CLAMP = 1e30  # a trust-ratio bound that never binds (JSON has no infinity)
METHODS = [("natural", "none", {}), ("fgsm_rs", "fgsm_rs", {"eps": EPS}),
           ("pgd-3", "pgd", {"eps": EPS, "steps": 3, "alpha": 2.5 * EPS / 3}),
           ("pgd-10", "pgd", {"eps": EPS, "steps": 10, "alpha": 2.5 * EPS / 10}),
           ("free-4", "free", {"eps": EPS, "steps": 4}), ("conadv", "conadv", {"eps": EPS})]
# methods timed with the step guard's deferred agreement, its synchronous one (one host read per
# optimizer step) and without the guard: what the guard costs, and what deferring it saves
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
    budget_s: float = 480.0  # no section starts after this; the whole check stays under 10 minutes
    compile_backend: str = "inductor"  # the tuned loops' torch.compile backend
    sweep: Tuple[int, ...] = (128, 256, 512)  # micro-batches of the batch sweep (on models[0])
    methods: Optional[Tuple[str, ...]] = None  # the methods of ``tuned`` and ``throughput`` (None: all)


def plan_methods(plan: Plan) -> list:
    """The (label, attack, kwargs) entries of :data:`METHODS` that ``plan`` times, in their order."""
    return [m for m in METHODS if plan.methods is None or m[0] in plan.methods]


def make_plan(device: torch.device, quick: bool) -> Plan:
    dtype = "bfloat16" if device.type == "cuda" else None
    if quick:  # the code paths in seconds: dynamo's graph capture without code generation
        tiny = ModelSpec("test_resnet", 16, 4, "native")
        return Plan([tiny], tiny, dtype, steps=2, overlap_steps=2, rounds=1, warmup=1, codec_repeats=3, dist_steps=3,
                    dist_pgd_steps=1, budget_s=180.0, compile_backend="eager", sweep=(4, 8))
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


def build_bench(spec: ModelSpec, plan: Plan, device: torch.device, seed: int = 0, tuned: bool = False) -> Bench:
    """The engine and the bare copy; ``tuned``: both channels-last and compiled (``--channels-last on
    --compile on``, the plan's backend), and the batch channels-last."""
    from dat_ds.engine import initialize
    torch.manual_seed(0)  # the same weights on every rank
    model = create_model(spec.name, 10, 3, spec.img_size, stem=spec.stem)
    bare = copy.deepcopy(model).to(device)
    engine = initialize(model, ds_config(spec.batch, plan.dtype), steps_per_epoch=1000, epochs=1)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(spec.batch, 3, spec.img_size, spec.img_size, generator=g).to(device)
    y = torch.randint(0, 10, (spec.batch,), generator=g).to(device)
    if tuned:
        for m in (engine.module, bare):
            speed.prepare(m, "on", "on", device, backend=plan.compile_backend)
        x = x.contiguous(memory_format=torch.channels_last)
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


def frozen_attack(model, x, y, attack) -> torch.Tensor:
    """PGD on ``model`` as a tuned loop runs it: BatchNorm in eval mode and the weights frozen, so the
    attack's backward computes the input's gradient alone. Eager autograd prunes the weights' gradients
    of ``autograd.grad(loss, delta)`` by itself; a compiled model's backward graph does not (it was
    traced with the weights requiring gradients), and computed them in every attack step."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        return bare_pgd(model, x, y, attack.eps, attack.alpha, attack.steps)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train()


def bare_run(b: Bench, attack) -> Callable[[int], None]:
    """``run(n)``: n minibatches of the same math in a plain PyTorch loop (attack, loss, backward, LAMB)."""
    model, opt, x, y = b.bare, b.bare_opt, b.x, b.y
    if isinstance(attack, attacks.Free):
        return _bare_free(b, attack)
    if isinstance(attack, attacks.ConAdv):
        stale = speed.compile_like(model, copy.deepcopy(model))

        def perturb():  # weights of the previous update, attacked in sequence
            torch._foreach_copy_([t.data for t in (*stale.parameters(), *stale.buffers())],
                                 [t.data for t in (*model.parameters(), *model.buffers())])
            return frozen_attack(stale, x, y, attack)
    elif isinstance(attack, attacks.NoAttack):
        def perturb():
            return x
    else:
        def perturb():
            return frozen_attack(model, x, y, attack)

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
    return Plan(**{**d, "models": [ModelSpec(**m) for m in d["models"]], "dist_model": ModelSpec(**d["dist_model"]),
                   "sweep": tuple(d["sweep"])})

