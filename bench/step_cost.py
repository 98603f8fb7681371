"""Step cost of DAT per attack, through dat-ds vs a bare PyTorch loop doing the same math.

For each method (natural, FGSM-RS, PGD-k, Free-m, ConAdv) one training step is: attack -> loss -> backward ->
gradient exchange -> optimizer step. Three implementations are timed side by side, interleaved:

* ``dat-ds``: ``dat_ds.trainer.train_epoch`` on a DeepSpeed engine (world size 1), timers on, with the
  per-step guard a training run has (non-finite check and stop flag, one tiny all-reduce);
* ``bare``: a plain PyTorch loop with the same model, attack rule (input gradients only) and
  optimizer (dat-ds's LAMB), no DeepSpeed;
* ``reference``: the attack as the DAT reference code writes it, ``loss.backward()`` through
  the weights at every attack step (weight gradients computed and thrown away).

    python bench/step_cost.py                       # PreAct-ResNet-18, 32x32, batch 64
    python bench/step_cost.py --backbone test_resnet --batch 128 --img-size 28 --in-chans 1
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table, time_calls  # noqa: E402

from dat_ds import attacks, compress, dist  # noqa: E402
from dat_ds.engine import initialize  # noqa: E402
from dat_ds.guard import StepGuard  # noqa: E402
from dat_ds.metrics import Timers  # noqa: E402
from dat_ds.models import create_model  # noqa: E402
from dat_ds.optim import Lamb, param_groups  # noqa: E402
from dat_ds.trainer import train_epoch  # noqa: E402


def bare_pgd(model, x, y, eps, alpha, steps):
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = ((x + delta).clamp(0, 1) - x)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def reference_pgd(model, x, y, eps, alpha, steps):
    """As the DAT reference code does it: a full backward (weights included) per attack step."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = ((x + delta).clamp(0, 1) - x)
    for _ in range(steps):
        delta.requires_grad_(True)
        F.cross_entropy(model(x + delta), y).backward()
        delta = (delta.detach() + alpha * delta.grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    model.zero_grad(set_to_none=True)
    return (x + delta).detach()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="preactresnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pgd-steps", type=int, nargs="+", default=[1, 3, 10])
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--free-m", type=int, default=4, help="replays of Free-m")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-style attack")
    args = p.parse_args()

    dist.init()
    torch.manual_seed(0)
    model = create_model(args.backbone, 10, args.in_chans, args.img_size)
    bare_model = copy.deepcopy(model)
    # gradient_clipping 0 as in every shipped config (DeepSpeed's default, 1.0, would clip: other math, +1 norm pass)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 5e-4}}}
    engine = initialize(model, cfg, steps_per_epoch=1000, epochs=1)
    bare_opt = Lamb(param_groups(bare_model, 5e-4), lr=1e-3)
    x = torch.rand(args.batch, args.in_chans, args.img_size, args.img_size, device=engine.device)
    y = torch.randint(0, 10, (args.batch,), device=engine.device)
    reducer, timers = compress.create("none"), Timers()
    guard = StepGuard(engine)

    methods = {"natural": ("none", {}), "fgsm_rs": ("fgsm_rs", {"eps": args.eps})}
    for k in args.pgd_steps:
        methods[f"pgd-{k}"] = ("pgd", {"eps": args.eps, "steps": k, "alpha": 2.5 * args.eps / k})
    methods[f"free-{args.free_m}"] = ("free", {"eps": args.eps, "steps": args.free_m})
    methods["conadv"] = ("conadv", {"eps": args.eps})

    def framework_step(attack):
        return lambda: train_epoch(engine, [(x, y)], attack, reducer, timers, guard=guard)

    def bare_step(attack_fn):
        def step():
            bare_model.train()
            x_adv = attack_fn(bare_model, x, y)
            loss = F.cross_entropy(bare_model(x_adv), y)
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()
        return step

    def bare_free(m):
        delta = torch.zeros_like(x)

        def step():
            bare_model.train()
            for _ in range(m):  # one backward per replay gives weight and input gradients
                x_adv = (x + delta).clamp(0, 1).requires_grad_(True)
                loss = F.cross_entropy(bare_model(x_adv), y)
                bare_opt.zero_grad(set_to_none=True)
                loss.backward()
                bare_opt.step()
                delta.add_(x_adv.grad.sign(), alpha=args.eps).clamp_(-args.eps, args.eps)
        return step

    def bare_conadv(attack):
        stale = copy.deepcopy(bare_model)

        def attack_fn(m, a, b):
            torch._foreach_copy_([t.data for t in (*stale.parameters(), *stale.buffers())],
                                 [t.data for t in (*m.parameters(), *m.buffers())])
            return _eval_mode(stale, bare_pgd, a, b, args.eps, attack.alpha, attack.steps)
        return bare_step(attack_fn)

    rows, results, updates = [], {}, {}
    for name, (attack_name, kw) in methods.items():
        attack = attacks.create(attack_name, **kw)
        updates[name] = attack.steps if attack_name == "free" else 1
        fns = {"dat-ds": framework_step(attack)}
        if attack_name == "none":
            fns["bare"] = bare_step(lambda m, a, b: a)
        elif attack_name == "free":
            fns["bare"] = bare_free(attack.steps)
        elif attack_name == "conadv":
            fns["bare"] = bare_conadv(attack)
        else:
            steps, alpha = attack.steps, attack.alpha
            fns["bare"] = bare_step(lambda m, a, b: _eval_mode(m, bare_pgd, a, b, args.eps, alpha, steps))
            if not args.no_reference:
                fns["reference"] = bare_step(lambda m, a, b: _eval_mode(m, reference_pgd, a, b, args.eps, alpha, steps))
        timed = time_calls(fns, args.repeats)
        results[name] = {k: v / updates[name] for k, v in timed.items()}  # seconds per parameter update
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}s/update" for k, v in results[name].items()), flush=True)

    nat = results["natural"]
    for name, r in results.items():
        k = methods[name][1].get("steps", 1) if methods[name][0] in ("pgd", "fgsm_rs") else 0
        ref = r.get("reference")
        rows.append([name, r["dat-ds"], r["dat-ds"] / nat["dat-ds"], r["bare"], r["bare"] / nat["bare"],
                     f"{100 * (r['dat-ds'] / r['bare'] - 1):+.1f}%",
                     "-" if ref is None else f"{ref / nat['bare']:.2f}", f"{0.7 * (k + 1):.2f}" if k else "-"])
    headers = ["method", "dat-ds s/update", "ratio to natural", "bare s/update", "bare ratio", "dat-ds vs bare",
               "reference-attack ratio", "target 0.7(k+1)"]
    print(f"\nmachine: {machine()}")
    print(f"backbone {args.backbone}, batch {args.batch}, {args.in_chans}x{args.img_size}x{args.img_size}, "
          f"median of {args.repeats} interleaved steps; free-m: time per replay (= per update); "
          f"conadv: attack and update in sequence on the CPU\n")
    print(table(headers, rows))
    path = save("step_cost", {"machine": machine(), "settings": vars(args), "seconds_per_update": results,
                              "table": {"headers": headers, "rows": rows}})
    print(f"\nwritten: {path}")


def _eval_mode(model, fn, x, y, eps, alpha, steps):
    """Attacks run with BatchNorm in eval mode, as dat-ds's default bn_mode does."""
    model.eval()
    try:
        return fn(model, x, y, eps, alpha, steps)
    finally:
        model.train()


if __name__ == "__main__":
    main()
