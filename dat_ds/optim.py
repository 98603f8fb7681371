"""Outer minimization: LAMB with the paper's layerwise adaptive LR, baselines, and LR schedules.

The ds_config JSON describes the optimizer and schedule (``"optimizer"``, ``"scheduler"``); dat-ds
builds them here and hands them to ``deepspeed.initialize`` as client objects, because
DeepSpeed's own ``Lamb`` is a CUDA-only fused kernel and has no warm-up + piecewise-decay
schedule. The same code runs on CPU and GPU.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


class Lamb(Optimizer):
    """LAMB (You et al. 2019) with the DAT layerwise adaptive LR (paper eq. 6).

    Per parameter tensor (layer) ``l``: ``u_l`` is the bias-corrected Adam direction plus weight
    decay, and ``theta_l <- theta_l - lr * phi(||theta_l||) / ||u_l|| * u_l`` with
    ``phi(z) = min(max(z, c_l), c_u)``. A layer whose weight or update norm is zero takes the
    plain step (ratio 1), so zero-initialised biases still move. Runs as a handful of
    ``torch._foreach`` kernels per group, with no host-device synchronisation.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, c_l: float = 0.0, c_u: float = 10.0, bias_correction: bool = True):
        if lr <= 0:
            raise ValueError(f"Lamb lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lamb betas must lie in [0, 1), got {betas}")
        if not 0 <= c_l <= c_u:
            raise ValueError(f"Lamb needs 0 <= c_l <= c_u, got c_l={c_l} c_u={c_u}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, c_l=c_l, c_u=c_u,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["step"] = 0
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            self._update(group, params)
        return loss

    def _update(self, group: dict, params: List[torch.Tensor]) -> None:
        b1, b2 = group["betas"]
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        for p in params:
            self.state[p]["step"] += 1
        t = self.state[params[0]]["step"]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(c2))
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(m, denom)
        torch._foreach_div_(update, c1)
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(update))
        phi = w_norm.clamp(group["c_l"], group["c_u"])
        ratio = torch.where((w_norm > 0) & (u_norm > 0), phi / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(update, list(ratio.unbind()))
        torch._foreach_add_(params, update, alpha=-group["lr"])


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_1d: bool = True) -> list:
    """Weight decay on weight matrices/kernels only; biases and norm scales are left alone.

    A model may carry ``lr_rules``: ``[(prefix, {"lr_mult": m, "frozen_epochs": e}), ...]``. A
    parameter whose name starts with ``prefix`` (first matching rule) lands in a group with those
    keys: the schedule multiplies its LR by ``lr_mult`` and holds it at 0 for the first
    ``frozen_epochs`` epochs (see :func:`set_lr_rules`).
    """
    rules = getattr(model, "lr_rules", None) or []
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = next((r for prefix, r in rules if name.startswith(prefix)), {})
        decay = not (no_decay_1d and p.ndim <= 1)
        key = (decay, float(rule.get("lr_mult", 1.0)), float(rule.get("frozen_epochs", 0.0)))
        groups.setdefault(key, []).append(p)
    out = []
    for decay in (True, False):  # the plain decay / no-decay pair first, as before
        out.append({"params": groups.pop((decay, 1.0, 0.0), []), "weight_decay": weight_decay if decay else 0.0})
    for (decay, mult, frozen), params in groups.items():
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult,
                    "frozen_epochs": frozen})
    return [g for g in out if g["params"]] or out[:1]  # DeepSpeed drops empty groups (the schedule has one per group)


def set_lr_rules(model: torch.nn.Module, head_prefix: str, head_lr_mult: float = 1.0,
                 head_only_epochs: float = 0.0) -> torch.nn.Module:
    """Fine-tuning LR rules (read by :func:`param_groups` and the schedules): the head's LR times
    ``head_lr_mult``; every other parameter frozen (LR 0) for the first ``head_only_epochs`` epochs,
    then re-warmed linearly over the schedule's warm-up (LP-FT, Kumar et al. 2022).

    Frozen parameters keep ``requires_grad`` and their gradients, so the gradient exchange sees
    the same flat layout on every step and every rank; only their step size is 0, which leaves
    them bit-for-bit unchanged (weight decay included).
    """
    if head_lr_mult <= 0 or head_only_epochs < 0:
        raise ValueError(f"need head_lr_mult > 0 and head_only_epochs >= 0, got {head_lr_mult} and {head_only_epochs}")
    model.lr_rules = [(head_prefix, {"lr_mult": head_lr_mult}), ("", {"frozen_epochs": head_only_epochs})]
    return model


@OPTIMIZERS.register("Lamb")
def _lamb(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, c_l=0.0, c_u=10.0,
          bias_correction=True, no_decay_1d=True):
    return Lamb(param_groups(model, weight_decay, no_decay_1d), lr=lr, betas=betas, eps=eps,
                c_l=c_l, c_u=c_u, bias_correction=bias_correction)


@OPTIMIZERS.register("SGD")
def _sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False, no_decay_1d=True):
    if lr <= 0 or momentum < 0:
        raise ValueError(f"SGD needs lr > 0 and momentum >= 0, got lr={lr} momentum={momentum}")
    return torch.optim.SGD(param_groups(model, weight_decay, no_decay_1d), lr=lr, momentum=momentum,
                           nesterov=nesterov)


@OPTIMIZERS.register("AdamW")
def _adamw(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, no_decay_1d=True):
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay_1d), lr=lr, betas=betas, eps=eps)


@OPTIMIZERS.register("Lars")
def _lars(model, lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coeff=0.001, no_decay_1d=True):
    from timm.optim import Lars
    return Lars(param_groups(model, weight_decay, no_decay_1d), lr=lr, momentum=momentum,
                trust_coeff=trust_coeff)


def create_optimizer(spec: dict, model: torch.nn.Module) -> Optimizer:
    """Build the ds_config's ``{"type": ..., "params": {...}}`` optimizer for ``model``."""
    return OPTIMIZERS.create(spec.get("type", "Lamb"), model=model, **spec.get("params", {}))


def warmup_piecewise(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
                     milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """LR factor at optimizer step ``step``: linear warm-up, then ``gamma`` at each milestone.

    Milestones are fractions of the whole run, so ``--epochs`` rescales the schedule.
    """
    warm = warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return (step + 1) / warm
    passed = sum(step >= m * epochs * steps_per_epoch for m in milestones)
    return gamma ** passed


def _group_factor(fn, group: dict, steps_per_epoch: int, warmup_steps: float):
    """``fn`` scaled by the group's ``lr_mult``, 0 during its ``frozen_epochs``, then re-warmed."""
    mult, frozen = group.get("lr_mult", 1.0), round(group.get("frozen_epochs", 0.0) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < frozen:
            return 0.0
        ramp = min(1.0, (step - frozen + 1) / warmup_steps) if frozen and warmup_steps else 1.0
        return mult * ramp * fn(step)
    return factor


def _lambda_lr(optimizer, fn, steps_per_epoch: int, warmup_steps: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, [_group_factor(fn, g, steps_per_epoch, warmup_steps) for g in optimizer.param_groups])


@SCHEDULERS.register("WarmupPiecewise")
def _warmup_piecewise(optimizer, steps_per_epoch, epochs, global_batch_size, warmup_epochs=0.0,
                      milestones=(0.5, 0.75), gamma=0.1, base_batch_size: Optional[int] = None):
    """``base_batch_size`` set: lr is scaled by ``global_batch / base_batch_size`` (Goyal et al. 2017)."""
    if warmup_epochs < 0 or not all(0 < m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"scheduler needs warmup_epochs >= 0 and increasing milestones in (0, 1) "
                         f"(fractions of the run), got warmup_epochs={warmup_epochs} milestones={list(milestones)}")
    scale = global_batch_size / base_batch_size if base_batch_size else 1.0
    return _lambda_lr(optimizer, lambda s: scale * warmup_piecewise(s, steps_per_epoch, epochs, warmup_epochs,
                                                                      milestones, gamma),
                      steps_per_epoch, warmup_epochs * steps_per_epoch)


@SCHEDULERS.register("Constant")
def _constant(optimizer, steps_per_epoch, epochs, global_batch_size):
    return _lambda_lr(optimizer, lambda s: 1.0, steps_per_epoch)


def create_scheduler(spec: Optional[dict], optimizer: Optimizer, steps_per_epoch: int, epochs: int,
                     global_batch_size: int):
    spec = spec or {"type": "Constant"}
    return SCHEDULERS.create(spec.get("type", "WarmupPiecewise"), optimizer=optimizer,
                             steps_per_epoch=steps_per_epoch, epochs=epochs,
                             global_batch_size=global_batch_size, **spec.get("params", {}))
