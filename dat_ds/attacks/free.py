"""Free-m adversarial training (Shafahi et al. 2019): "adversarial training for free"."""
from __future__ import annotations

from typing import Optional

import torch

from .base import ATTACKS, Attack, box, check, noise_like
from .pgd import pgd_linf
from .shapes import Replay


@ATTACKS.register("free")
class Free(Attack):
    """Free-m: each minibatch replayed ``steps`` (= m) times; ONE backward per replay gives the
    weight gradient (for the update) and the input gradient, which moves the perturbation
    ``d <- clip(d + alpha * sign(grad_x))`` (``alpha`` defaults to eps). ``d`` persists from one
    minibatch to the next, and a run makes ``epochs / m`` passes so the gradient count matches
    natural training. Its step shape is :class:`~dat_ds.attacks.shapes.Replay`, which drives
    :meth:`adversarial_input` and :meth:`update`. As an evaluation attack, ``perturb`` runs the
    same m sign steps from zero. Checkpoint state: the carried perturbation ``delta``.
    """

    shape = Replay()

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 4, bn_mode: str = "eval",
                 loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)
        check("steps (replays m)", steps, 1)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else self.eps
        self._delta: Optional[torch.Tensor] = None

    def _perturb(self, model, x, y):
        return pgd_linf(model, x, y, self.eps, self.alpha, self.steps, False, self.loss_fn(model, x), self.start_std)

    def adversarial_input(self, x: torch.Tensor) -> torch.Tensor:
        """``clip_[0,1](x + d)`` as a leaf that collects the input gradient of the next backward."""
        if self._delta is None or self._delta.shape[1:] != x.shape[1:] or len(self._delta) < len(x):
            self._delta = torch.zeros_like(x)
            if self.start_std:   # a loss flat at x (TRADES' KL) would never move a zero perturbation
                noise = noise_like(x, lambda t: t.normal_())
                self._delta.add_(noise, alpha=self.start_std).clamp_(-self.eps, self.eps)
        delta = self._delta[:len(x)]
        return (x + delta).clamp_(0, 1).requires_grad_(True)

    def update(self, x: torch.Tensor, x_adv: torch.Tensor) -> None:
        """``d <- clip_eps(d + alpha * sign(grad_x))`` from the gradient the training backward left."""
        if x_adv.grad is None:
            raise RuntimeError("Free-m: the training backward produced no input gradient")
        delta = self._delta[:len(x)]
        delta.add_(x_adv.grad.sign(), alpha=self.alpha).clamp_(-self.eps, self.eps)
        lo, hi = box(x.clone(), self.eps)
        torch.max(torch.min(delta, hi, out=delta), lo, out=delta)

    def state_dict(self) -> dict:
        return {} if self._delta is None else {"delta": self._delta}

    def load_state_dict(self, state: dict) -> None:
        self._delta = state.get("delta")
