"""FGSM with random start (Wong et al. 2020, "Fast is better than free")."""
from __future__ import annotations

from typing import Optional

from .base import ATTACKS
from .pgd import PGD


@ATTACKS.register("fgsm_rs")
class FGSMRS(PGD):
    """One step of ``alpha = 1.25 eps`` from a uniform start in the Linf ball.

    Single-step training can overfit catastrophically (robustness to PGD collapses within an
    epoch), so the trainer's held-out PGD/FGSM check is on by default for it.
    """

    single_step = True
    reference_for_norm = False

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 1, bn_mode: str = "eval",
                 loss: str = "ce"):
        if steps != 1:
            raise ValueError(f"fgsm_rs takes exactly one step, got steps={steps}; use --attack pgd for more")
        super().__init__(eps, 1.25 * eps if alpha is None else alpha, 1, True, bn_mode, loss)
