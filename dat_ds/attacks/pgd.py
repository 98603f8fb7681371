"""PGD-k under Linf (Madry et al. 2017) and L2: the reference attacks robust accuracy is measured with."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .base import ATTACKS, Attack, LossFn, box, check, noise_like, sum_ce


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
             random_start: bool = True, loss_fn: LossFn = sum_ce, start_std: float = 0.0) -> torch.Tensor:
    """PGD-k under Linf: ``d <- clip(d + alpha * sign(grad_d L(x + d)))``.

    Returns ``x + d`` with ``|d|_inf <= eps`` and ``x + d`` in [0, 1]. With ``steps=1`` and
    ``alpha=1.25 eps`` this is FGSM-RS (Wong et al. 2020). Without a random start ``d`` starts
    at 0, or at ``start_std * N(0, 1)`` (a loss flat at x, see ``START_STD``).
    """
    x = x.detach()
    lo, hi = box(x.clone(), eps)
    delta = noise_like(x, lambda t: t.uniform_(-eps, eps)) if random_start else torch.zeros_like(x)
    if not random_start and start_std:
        delta = noise_like(x, lambda t: t.normal_().mul_(start_std))
    delta = torch.max(torch.min(delta, hi), lo)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
        delta = delta.detach().add_(g.sign_(), alpha=alpha)
        delta = torch.max(torch.min(delta, hi, out=delta), lo, out=delta)
    return (x + delta).detach()


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def project_l2(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L2 ball of radius ``eps``, then into the [0, 1] box (which only shrinks it)."""
    delta = delta * (eps / per_sample_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp_(0, 1) - x


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
           random_start: bool = True, loss_fn: LossFn = sum_ce, start_std: float = 0.0) -> torch.Tensor:
    """PGD-k under L2: ``d <- proj(d + alpha * g / ||g||_2)`` per sample; random start in the ball
    (without one: 0, or ``start_std * N(0, 1)`` projected into the ball)."""
    x = x.detach()
    if random_start:
        delta = noise_like(x, torch.Tensor.normal_)
        radius = torch.rand(len(x), *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype) * eps
        delta = project_l2(delta / per_sample_norm(delta) * radius, x, eps)
    elif start_std:
        delta = project_l2(noise_like(x, lambda t: t.normal_().mul_(start_std)), x, eps)
    else:
        delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
        delta = project_l2(delta.detach() + alpha * g / per_sample_norm(g), x, eps)
    return (x + delta).detach()


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD-k, Linf, random start (Madry et al. 2017).

    Settings: ``eps`` (radius in [0, 1] pixels), ``alpha`` (step, default ``2.5 eps / steps``),
    ``steps`` (k, 10), ``random_start`` (without it: from x, or from x + 0.001 N(0, 1) when
    ascending TRADES' KL), ``bn_mode`` (BatchNorm mode while attacking).
    """

    reference_for_norm = True

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 10, random_start: bool = True,
                 bn_mode: str = "eval", loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)
        check("steps", steps, 1)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        check("alpha", self.alpha, 0.0, allow_equal=self.eps == 0)
        self.random_start = bool(random_start)

    def _perturb(self, model, x, y):
        return pgd_linf(model, x, y, self.eps, self.alpha, self.steps, self.random_start, self.loss_fn(model, x),
                        self.start_std)


@ATTACKS.register("pgd_l2")
class PGDL2(PGD):
    """PGD-k under L2 (``eps`` is an L2 radius); ``alpha`` defaults to ``2.5 eps / steps``."""

    norm = "l2"

    def _perturb(self, model, x, y):
        return pgd_l2(model, x, y, self.eps, self.alpha, self.steps, self.random_start, self.loss_fn(model, x),
                      self.start_std)
