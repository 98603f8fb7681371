"""Where the DeepSpeed engine's time goes: engine.forward / backward / step against bare PyTorch.

Natural training, one rank, phases timed side by side (interleaved, median): ``engine(x)`` vs
``model(x)``, ``engine.backward(loss)`` vs ``zero_grad + loss.backward()``, ``engine.step()`` vs
``optimizer.step()``, the same model and optimizer (dat-ds's LAMB). Two engine configurations:

* ``DeepSpeed defaults``: a ds_config that leaves ``gradient_clipping`` out gets DeepSpeed's
  default, 1.0: ``engine.step`` then runs ``clip_grad_norm_`` (one norm pass over every
  gradient, and different math from the bare loop);
* ``gradient_clipping 0``: what every shipped ds_config sets, and what the step-cost benchmark
  now uses.

A cProfile of the engine's own Python (time inside ``deepspeed/`` functions, per step) shows
what is left.

    python bench/engine_overhead.py                        # PreAct-ResNet-18, 32x32, batch 64
    python bench/engine_overhead.py --batch 16 --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

from dat_ds import dist  # noqa: E402
from dat_ds.engine import initialize  # noqa: E402
from dat_ds.models import create_model  # noqa: E402
from dat_ds.optim import Lamb, param_groups  # noqa: E402

PHASES = ("forward", "backward", "step")


def timed(fns) -> list:
    out, t = [], time.perf_counter()
    for fn in fns:
        fn()
        now = time.perf_counter()
        out.append(now - t)
        t = now
    return out


def engine_step(engine, x, y):
    box = {}
    return lambda: timed([lambda: box.update(loss=F.cross_entropy(engine(x), y)),
                          lambda: engine.backward(box["loss"]), engine.step])


def bare_step(model, opt, x, y):
    box = {}

    def backward():
        opt.zero_grad(set_to_none=True)
        box["loss"].backward()
    return lambda: timed([lambda: box.update(loss=F.cross_entropy(model(x), y)), backward, opt.step])


def profile_engine(step, repeats: int) -> list:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.items():
        if "deepspeed" in file and "nvtx" not in file:
            rows.append((tottime / repeats, f"{file.split('deepspeed/')[-1]}:{line}({fn})"))
    return sorted(rows, reverse=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="preactresnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dist.init()
    torch.manual_seed(0)
    base = create_model(args.backbone, 10, 3, args.img_size)
    x = torch.rand(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "zero_optimization": {"stage": 0},
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 5e-4}}}
    variants = {"DeepSpeed defaults (gradient_clipping 1.0)": cfg,
                "gradient_clipping 0 (shipped configs)": {**cfg, "gradient_clipping": 0.0}}
    fns = {}
    for name, c in variants.items():
        fns[name] = engine_step(initialize(copy.deepcopy(base), c, steps_per_epoch=1000, epochs=1), x, y)
    bare = copy.deepcopy(base)
    fns["bare PyTorch"] = bare_step(bare, Lamb(param_groups(bare, 5e-4), lr=1e-3), x, y)
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            samples[k].append(fn())
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in samples.items()}
    bare_total = sum(med["bare PyTorch"])
    rows = []
    for k, m in med.items():
        row = {"variant": k}
        for phase, v, b in zip(PHASES, m, med["bare PyTorch"]):
            row[f"{phase} ms"] = 1e3 * v
            row[f"{phase} vs bare ms"] = f"{1e3 * (v - b):+.1f}"
        row["step total s"] = sum(m)
        row["vs bare"] = f"{100 * (sum(m) / bare_total - 1):+.1f}%"
        rows.append(row)
        print(k, [f"{1e3 * v:.0f} ms" for v in m], row["vs bare"], flush=True)
    top = profile_engine(fns["gradient_clipping 0 (shipped configs)"], max(2, args.repeats // 2))
    notes = ["phases: forward = engine(x) + loss; backward = engine.backward (bare: zero_grad + loss.backward); "
             "step = engine.step (bare: optimizer.step; DeepSpeed sets grads to None inside it)",
             "before: the step-cost benchmark built its engine from a ds_config without gradient_clipping, so "
             "DeepSpeed clipped at its default 1.0 (a gradient-norm pass per step and a different update than the "
             "bare loop); it now sets gradient_clipping 0 like every shipped config"]
    notes += [f"DeepSpeed's own Python per step (cProfile, time inside deepspeed/ functions, excluding the model "
              f"and optimizer they call): {1e3 * sum(own for own, _ in top):.1f} ms in all; largest: " + "; ".join(
                  f"{name} {1e3 * own:.2f} ms" for own, name in top[:5])]
    save("engine_overhead", {"title": "DeepSpeed engine overhead per phase (natural training, 1 rank)",
                             "machine": machine(), "settings": vars(args), "rows": rows, "notes": notes,
                             "bars": {"step time vs bare PyTorch (s)": {k: sum(m) for k, m in med.items()}}})


if __name__ == "__main__":
    main()
