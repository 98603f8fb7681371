"""The no-gradient baselines: natural training (``none``) and uniform noise in the Linf ball (``noise``)."""
from __future__ import annotations

from .base import ATTACKS, Attack, noise_like


@ATTACKS.register("none")
class NoAttack(Attack):
    """Natural (non-adversarial) training: returns ``x`` unchanged."""

    uses_gradients = False

    def __init__(self, eps: float = 0.0, bn_mode: str = "eval", loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)

    def _perturb(self, model, x, y):
        return x


@ATTACKS.register("noise")
class UniformNoise(Attack):
    """Uniform noise in the Linf ball: the no-gradient baseline every attack must beat."""

    uses_gradients = False

    def __init__(self, eps: float, bn_mode: str = "eval", loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)

    def _perturb(self, model, x, y):
        return (x + noise_like(x, lambda t: t.uniform_(-self.eps, self.eps))).clamp_(0, 1)
