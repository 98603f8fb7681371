"""``lamb``: dat-ds's LAMB step beside DeepSpeed's fused CUDA LAMB (``FusedLamb``, what
``"optimizer": {"type": "Lamb"}`` selects in plain DeepSpeed) on the same model, and one step's
parameter delta compared: with matched settings (no bias correction, no trust-ratio clamp), where
the formulas agree, and with each optimizer's defaults; both also against a PyTorch transcription
of the fused kernel's formula, which runs on the CPU too."""
from __future__ import annotations

import copy
import math
import os
import time
from typing import List

import torch
import torch.nn.functional as F

from dat_ds.models import create_model
from dat_ds.optim import Lamb, param_groups

from .harness import LR, NO_CLAMP, WEIGHT_DECAY, Clock, Plan, guarded


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

