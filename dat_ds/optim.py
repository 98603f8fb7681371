"""Outer minimization: LAMB with the paper's layerwise adaptive LR, baselines, and LR schedules.

The ds_config JSON describes the optimizer and schedule (``"optimizer"``, ``"scheduler"``); dat-ds
builds them here and hands them to ``deepspeed.initialize`` as client objects, because
DeepSpeed's own ``Lamb`` is a CUDA-only fused kernel and has no warm-up + piecewise-decay
schedule. The same code runs on CPU and GPU.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from . import dist
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

    ``gate`` (set for one ``step`` by the step guard's deferred agreement): a 0-dim float on the
    device, 1 to apply the step, 0 to leave weights and moments exactly as they were (the
    gradients must then be finite, e.g. zeroed); :meth:`unstep` takes the step count back.
    """

    gate: Optional[torch.Tensor] = None

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
        self._stepped: List[List[torch.Tensor]] = []  # the parameters of the last step, per group

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._stepped = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["step"] = 0
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            self._update(group, params, self.gate)
            self._stepped.append(params)
        return loss

    def unstep(self) -> None:
        """Take back the step count of the last ``step`` (a gated step that applied nothing)."""
        for params in self._stepped:
            for p in params:
                self.state[p]["step"] -= 1
        self._stepped = []

    def _update(self, group: dict, params: List[torch.Tensor], gate: Optional[torch.Tensor] = None) -> None:
        b1, b2 = group["betas"]
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        for p in params:
            self.state[p]["step"] += 1
        t = self.state[params[0]]["step"]
        if gate is None:
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
        else:  # decay 1 where the gate is 0: with zero gradients the moments stay as they were
            torch._foreach_mul_(m, 1 - (1 - b1) * gate)
            torch._foreach_add_(m, grads, alpha=1 - b1)
            torch._foreach_mul_(v, 1 - (1 - b2) * gate)
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
        if gate is not None:
            ratio = ratio * gate
        torch._foreach_mul_(update, list(ratio.unbind()))
        torch._foreach_add_(params, update, alpha=-group["lr"])


def declared_no_decay(model: torch.nn.Module) -> List[str]:
    """Name patterns (``fnmatch``, full parameter names of ``model``) of the parameters the model
    declares exempt from weight decay: every submodule's ``no_weight_decay()`` (timm's convention,
    e.g. a ViT's ``pos_embed`` and ``cls_token``), prefixed with the submodule's path, so a
    backbone inside dat-ds's normalizing wrapper is heard. transformers models declare nothing
    of the kind (its Trainer exempts biases and norm weights by name: the 1-D rule here)."""
    patterns = []
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            patterns += [f"{prefix}.{name}" if prefix else name for name in declare()]
    return patterns


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_1d: bool = True) -> list:
    """Weight decay on weight matrices/kernels only; biases, norm scales and what the model
    declares (:func:`declared_no_decay`: position embeddings, class tokens) are left alone.
    ``no_decay_1d=False`` decays every parameter.

    A model may carry ``lr_rules``: ``[(prefix, {"lr_mult": m, "frozen_epochs": e}), ...]``. A
    parameter whose name starts with ``prefix`` (first matching rule) lands in a group with those
    keys: the schedule multiplies its LR by ``lr_mult`` and holds it at 0 for the first
    ``frozen_epochs`` epochs (see :func:`set_lr_rules`).
    """
    rules = getattr(model, "lr_rules", None) or []
    exempt = declared_no_decay(model)
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = next((r for prefix, r in rules if name.startswith(prefix)), {})
        decay = not (no_decay_1d and (p.ndim <= 1 or any(fnmatch.fnmatchcase(name, e) for e in exempt)))
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


# How the peak LR (and optionally the warm-up) grows with global batch / base batch.
# linear: Goyal et al. 2017 (SGD); sqrt: the rule for adaptive optimizers (You et al. 2019, LAMB).
LR_RULES = {"none": lambda ratio: 1.0, "linear": lambda ratio: ratio, "sqrt": math.sqrt}


@dataclass(frozen=True)
class LRPlan:
    """The schedule's numbers resolved for one run: what is printed at start and tested."""
    lr_scale: float  # peak LR = the optimizer's lr x lr_scale
    warmup_epochs: float  # after batch scaling and the cap
    warmup_steps: int
    global_batch_size: int
    lr_rule: str = "none"
    base_batch_size: Optional[int] = None

    def describe(self, base_lr: float) -> str:
        why = (f"lr {base_lr:g} x {self.lr_rule}({self.global_batch_size}/{self.base_batch_size})"
               if self.base_batch_size and self.lr_rule != "none" else f"lr {base_lr:g}, no batch scaling")
        return (f"LR schedule: peak lr {base_lr * self.lr_scale:.4g} ({why}) at global batch "
                f"{self.global_batch_size}; warm-up {self.warmup_epochs:.3g} epochs ({self.warmup_steps} steps)")


def lr_plan(steps_per_epoch: int, epochs: int, global_batch_size: int, warmup_epochs: float = 0.0,
            base_batch_size: Optional[int] = None, lr_rule: Optional[str] = None, warmup_rule: str = "none",
            max_warmup_fraction: float = 1.0) -> LRPlan:
    """Resolve the LR rule: peak LR scale and warm-up length at this global batch.

    ``lr_rule`` (``none`` | ``linear`` | ``sqrt``) scales the optimizer's ``lr`` by
    ``rule(global_batch / base_batch_size)``; left out, it is ``linear`` when ``base_batch_size`` is
    set. ``warmup_epochs`` is the warm-up at ``base_batch_size``, scaled by ``warmup_rule`` the same
    way (gradual warm-up, Goyal et al.), and never longer than ``max_warmup_fraction`` of the run, so
    a short run is not all warm-up.

    >>> lr_plan(10, 4, 1024, warmup_epochs=1, base_batch_size=256, lr_rule="sqrt").lr_scale
    2.0
    """
    check_lr_rule(warmup_epochs, base_batch_size, lr_rule, warmup_rule, max_warmup_fraction)
    lr_rule = lr_rule or ("linear" if base_batch_size else "none")
    ratio = global_batch_size / base_batch_size if base_batch_size else 1.0
    warm = min(warmup_epochs * LR_RULES[warmup_rule](ratio), max_warmup_fraction * epochs)
    return LRPlan(LR_RULES[lr_rule](ratio), warm, math.ceil(warm * steps_per_epoch), global_batch_size,
                  lr_rule, base_batch_size)


def check_lr_rule(warmup_epochs: float = 0.0, base_batch_size: Optional[int] = None, lr_rule: Optional[str] = None,
                  warmup_rule: str = "none", max_warmup_fraction: float = 1.0) -> None:
    """``ValueError`` naming the first bad LR-rule setting (also usable on a config before a run)."""
    for name, rule in (("lr_rule", lr_rule), ("warmup_rule", warmup_rule)):
        if rule is not None and rule not in LR_RULES:
            raise ValueError(f"scheduler {name} must be one of {', '.join(LR_RULES)}, got {rule!r}")
    if base_batch_size is not None and (isinstance(base_batch_size, bool) or not isinstance(base_batch_size, int)
                                        or base_batch_size < 1):
        raise ValueError(f"scheduler base_batch_size must be a positive integer, got {base_batch_size!r}")
    if base_batch_size is None and ((lr_rule or "none") != "none" or warmup_rule != "none"):
        raise ValueError(f"scheduler lr_rule={lr_rule!r} / warmup_rule={warmup_rule!r} scale with global batch / "
                         f"base_batch_size: set base_batch_size (the batch the lr and warm-up are tuned for)")
    if not 0 < max_warmup_fraction <= 1:
        raise ValueError(f"scheduler max_warmup_fraction must lie in (0, 1] (a share of the run), "
                         f"got {max_warmup_fraction!r}")
    if warmup_epochs < 0:
        raise ValueError(f"scheduler warmup_epochs must be >= 0, got {warmup_epochs!r}")


def _group_factor(fn, group: dict, steps_per_epoch: int, warmup_steps: float):
    """``fn`` scaled by the group's ``lr_mult``, 0 during its ``frozen_epochs``, then re-warmed."""
    mult, frozen = group.get("lr_mult", 1.0), round(group.get("frozen_epochs", 0.0) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < frozen:
            return 0.0
        ramp = min(1.0, (step - frozen + 1) / warmup_steps) if frozen and warmup_steps else 1.0
        return mult * ramp * fn(step)
    return factor


class PlannedLR(LambdaLR):
    """``LambdaLR`` that carries its :class:`LRPlan`; the plan stays out of ``state_dict`` (it is
    rebuilt from the config), so checkpoints keep loading with ``weights_only=True``."""

    def __init__(self, optimizer, lr_lambda, plan: LRPlan):
        self.lr_plan = plan
        super().__init__(optimizer, lr_lambda)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("lr_plan", None)
        return state


def _lambda_lr(optimizer, fn, steps_per_epoch: int, plan: LRPlan) -> LambdaLR:
    return PlannedLR(optimizer, [_group_factor(fn, g, steps_per_epoch, plan.warmup_steps)
                                 for g in optimizer.param_groups], plan)


@SCHEDULERS.register("WarmupPiecewise")
def _warmup_piecewise(optimizer, steps_per_epoch, epochs, global_batch_size, warmup_epochs=0.0,
                      milestones=(0.5, 0.75), gamma=0.1, base_batch_size: Optional[int] = None,
                      lr_rule: Optional[str] = None, warmup_rule: str = "none", max_warmup_fraction: float = 1.0):
    """Linear warm-up to the peak LR, then ``gamma`` at each milestone (fractions of the run).

    The peak LR and warm-up follow the global batch through :func:`lr_plan`.
    """
    if not all(0 < m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"scheduler needs warmup_epochs >= 0 and increasing milestones in (0, 1) "
                         f"(fractions of the run), got warmup_epochs={warmup_epochs} milestones={list(milestones)}")
    plan = lr_plan(steps_per_epoch, epochs, global_batch_size, warmup_epochs, base_batch_size, lr_rule,
                   warmup_rule, max_warmup_fraction)
    warm = plan.warmup_steps / steps_per_epoch
    return _lambda_lr(optimizer, lambda s: plan.lr_scale * warmup_piecewise(s, steps_per_epoch, epochs, warm,
                                                                              milestones, gamma),
                      steps_per_epoch, plan)


@SCHEDULERS.register("Constant")
def _constant(optimizer, steps_per_epoch, epochs, global_batch_size, base_batch_size: Optional[int] = None,
              lr_rule: Optional[str] = None):
    plan = lr_plan(steps_per_epoch, epochs, global_batch_size, 0.0, base_batch_size, lr_rule)
    return _lambda_lr(optimizer, lambda s: plan.lr_scale, steps_per_epoch, plan)


def create_scheduler(spec: Optional[dict], optimizer: Optimizer, steps_per_epoch: int, epochs: int,
                     global_batch_size: int, verbose: bool = True):
    """Build the ds_config's ``"scheduler"``; the main rank prints the resolved peak LR and warm-up."""
    spec = spec or {"type": "Constant"}
    sched = SCHEDULERS.create(spec.get("type", "WarmupPiecewise"), optimizer=optimizer,
                              steps_per_epoch=steps_per_epoch, epochs=epochs,
                              global_batch_size=global_batch_size, **spec.get("params", {}))
    if verbose and dist.is_main():
        print(sched.lr_plan.describe(optimizer.defaults["lr"]), flush=True)
    return sched
