"""Inner-maximization oracles: the attacks that make adversarial examples.

Every attack works in [0, 1] pixel space (normalization lives inside the model), takes input
gradients only (``torch.autograd.grad`` w.r.t. the perturbation, never ``.backward()`` on
parameters) and must be given ``engine.module``, never the DeepSpeed engine itself: the
engine's forward installs backward hooks that an input-gradient pass would disturb.

    >>> from dat_ds import attacks
    >>> pgd = attacks.create("pgd", eps=8 / 255, alpha=2 / 255, steps=10)
    >>> x_adv = pgd.perturb(model, x, y)            # doctest: +SKIP

``ATTACKS.names()`` drives the recipes' ``--attack`` choices.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Registry

ATTACKS = Registry("attack")
BN_MODES = ("eval", "train")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sum_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A summed loss keeps every sample's gradient at full size; only its sign is used.
    return F.cross_entropy(logits, y, reduction="sum")


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Run the attack with BatchNorm/Dropout in ``bn_mode`` and the weights frozen.

    ``eval`` (the default) uses running BatchNorm statistics, so the attack neither sees batch
    statistics of a half-made perturbation nor updates the running averages. ``train`` uses
    batch statistics, as some reference AT code does. Freezing the weights keeps autograd from
    recording anything for weight gradients, which attacks never need.
    """
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.train(bn_mode == "train")
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = _sum_ce) -> torch.Tensor:
    """Gradient of ``loss_fn(model(x), y)`` w.r.t. the input ``x`` only."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(model(x), y), x)
    return g


def _box(x: torch.Tensor, eps: float):
    """Per-pixel bounds of ``delta`` for the Linf ball intersected with the [0, 1] box."""
    return (-x).clamp_(min=-eps), (1 - x).clamp_(max=eps)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
             random_start: bool = True, loss_fn: LossFn = _sum_ce) -> torch.Tensor:
    """PGD-k under Linf (Madry et al. 2017): ``d <- clip(d + alpha * sign(grad_d L(x + d)))``.

    Returns ``x + d`` with ``|d|_inf <= eps`` and ``x + d`` in [0, 1]. With ``steps=1`` and
    ``alpha=1.25 eps`` this is FGSM-RS (Wong et al. 2020).
    """
    x = x.detach()
    lo, hi = _box(x.clone(), eps)
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    delta = torch.max(torch.min(delta, hi), lo)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
        delta = delta.detach().add_(g.sign_(), alpha=alpha)
        delta = torch.max(torch.min(delta, hi, out=delta), lo, out=delta)
    return (x + delta).detach()


def _check(name: str, value, low: float, allow_equal: bool = True) -> None:
    ok = value >= low if allow_equal else value > low
    if not ok:
        raise ValueError(f"{name} must be {'>=' if allow_equal else '>'} {low:g}, got {value}")


class Attack(abc.ABC):
    """Base class: ``perturb(model, x, y) -> x_adv`` inside the threat model and [0, 1]."""

    norm = "linf"
    uses_gradients = True

    def __init__(self, eps: float, bn_mode: str = "eval"):
        _check("eps", eps, 0.0)
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
        self.eps = float(eps)
        self.bn_mode = bn_mode

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.uses_gradients:
            return self._perturb(model, x.detach(), y)
        with attack_mode(model, self.bn_mode):
            return self._perturb(model, x, y)

    @abc.abstractmethod
    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's rule; runs inside :func:`attack_mode`."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


@ATTACKS.register("none")
class NoAttack(Attack):
    """Natural (non-adversarial) training: returns ``x`` unchanged."""

    def __init__(self, eps: float = 0.0, alpha: Optional[float] = None, steps: int = 0, bn_mode: str = "eval"):
        super().__init__(eps, bn_mode)

    uses_gradients = False

    def _perturb(self, model, x, y):
        return x


@ATTACKS.register("noise")
class UniformNoise(Attack):
    """Uniform noise in the Linf ball: the no-gradient baseline every attack must beat."""

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 0, bn_mode: str = "eval"):
        super().__init__(eps, bn_mode)

    uses_gradients = False

    def _perturb(self, model, x, y):
        return (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp_(0, 1)


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD-k, Linf, random start (Madry et al. 2017). ``alpha`` defaults to ``2.5 eps / steps``."""

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 10, random_start: bool = True,
                 bn_mode: str = "eval"):
        super().__init__(eps, bn_mode)
        _check("steps", steps, 1)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        _check("alpha", self.alpha, 0.0, allow_equal=self.eps == 0)
        self.random_start = bool(random_start)

    def _perturb(self, model, x, y):
        return pgd_linf(model, x, y, self.eps, self.alpha, self.steps, self.random_start)


@ATTACKS.register("fgsm_rs")
class FGSMRS(PGD):
    """FGSM with random start (Wong et al. 2020): one step of ``alpha = 1.25 eps`` from a uniform start."""

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 1, bn_mode: str = "eval"):
        if steps != 1:
            raise ValueError(f"fgsm_rs takes exactly one step, got steps={steps}; use --attack pgd for more")
        super().__init__(eps, 1.25 * eps if alpha is None else alpha, 1, True, bn_mode)


def create(name: str, **kwargs) -> Attack:
    """Build a registered attack by name, e.g. ``create("pgd", eps=0.1, steps=10)``."""
    return ATTACKS.create(name, **kwargs)


def names():
    return ATTACKS.names()
