"""Smooth-AT (SmoothAdv, Salman et al. 2019): the attack and the loss that train a base classifier
for randomized smoothing; certification is :mod:`dat_ds.smoothing`.

| registry | name | what |
|---|---|---|
| ``ATTACKS`` | ``smooth_pgd_l2`` | PGD-L2 on ``-log mean_j softmax(f(x + d + n_j))_y`` over m draws |
| ``OBJECTIVES`` | ``smooth`` | mean cross-entropy over m noisy copies of ``x_adv`` |

``--attack smooth_pgd_l2 --loss smooth`` trains Smooth-AT through the usual DAT loop (with
``eps = 0`` the attack is the identity and this is Gaussian data augmentation, Cohen et al.).
Every rank expands its own micro-batch to ``m x micro``: the noisy-copy batch grows with the
number of ranks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ATTACKS, check
from .objective import OBJECTIVES, Objective
from .pgd import PGD, pgd_l2


def check_noise(sigma: float, noise_copies: Optional[int] = None) -> None:
    check("sigma", sigma, 0.0, allow_equal=False)
    if noise_copies is not None:
        check("noise_copies", noise_copies, 1)


def smoothed_log_probs(model: nn.Module, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``log mean_j softmax(f(x + n_j))``: the soft smoothed classifier's log-probabilities.

    ``noise`` holds ``m`` draws per sample, ``(m * B, ...)`` with the copies of sample i at rows
    ``i m .. i m + m - 1`` (``repeat_interleave`` order); one forward of ``m * B`` inputs.
    """
    m = len(noise) // len(x)
    logits = model(x.repeat_interleave(m, dim=0) + noise)
    log_p = F.log_softmax(logits.float(), dim=1).view(len(x), m, -1)
    return torch.logsumexp(log_p, dim=1) - math.log(m)  # log of the mean, without underflow


def _sum_nll(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Summed, like the engine's PGD loss: each sample's step is normalised, only directions matter.
    return F.nll_loss(log_p, y, reduction="sum")


@ATTACKS.register("smooth_pgd_l2")
class SmoothPGDL2(PGD):
    """SmoothAdv PGD-L2 (Salman et al. 2019) against the soft smoothed classifier.

    Maximizes ``-log(mean_j softmax(f(x + d + n_j))_y)`` over ``||d||_2 <= eps``, with
    ``noise_copies`` (m) Gaussian draws ``n_j ~ N(0, sigma^2 I)`` per sample, the same draws
    for every step (as SmoothAdv does). ``alpha`` defaults to ``2 eps / steps`` and the attack
    starts from ``d = 0`` (SmoothAdv's rule); ``random_start=True`` starts inside the ball.
    Each step is one forward and backward of ``m * B`` inputs.
    """

    norm = "l2"

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 2, sigma: float = 0.25,
                 noise_copies: int = 4, random_start: bool = False, bn_mode: str = "eval", loss: str = "ce"):
        if loss != "ce":
            raise ValueError(f"smooth_pgd_l2 ascends the smoothed cross-entropy (loss 'ce'), got loss {loss!r}; "
                             f"pair it with --loss smooth")
        check("steps", steps, 1)
        super().__init__(eps, 2 * eps / steps if alpha is None else alpha, steps, random_start, bn_mode, loss)
        check_noise(sigma, noise_copies)
        self.sigma = float(sigma)
        self.noise_copies = int(noise_copies)

    def _perturb(self, model, x, y):
        if self.eps == 0:
            return x.detach()
        noise = torch.randn((len(x) * self.noise_copies, *x.shape[1:]), device=x.device, dtype=x.dtype) * self.sigma

        def smoothed(inputs):  # fixed noise: every step attacks the same Monte Carlo estimate
            return smoothed_log_probs(model, inputs, noise)

        return pgd_l2(smoothed, x, y, self.eps, self.alpha, self.steps, self.random_start, _sum_nll)


@OBJECTIVES.register("smooth")
class SmoothCE(Objective):
    """Mean cross-entropy over ``noise_copies`` (m) noisy copies of each adversarial example.

    One forward through the engine of ``m * B`` inputs ``x_adv.repeat_interleave(m) + n``, with
    fresh draws ``n ~ N(0, sigma^2 I)`` (not clipped to [0, 1], as in Cohen et al.). SmoothAdv's
    own code reuses the attack's draws here; drawing afresh keeps attack and objective
    independent (the same distribution, another sample).
    """

    def __init__(self, sigma: float = 0.25, noise_copies: int = 4):
        check_noise(sigma, noise_copies)
        self.sigma = float(sigma)
        self.noise_copies = int(noise_copies)

    def loss(self, engine, x, x_adv, y):
        m = self.noise_copies
        noisy = x_adv.repeat_interleave(m, dim=0)
        noisy = noisy + torch.randn_like(noisy) * self.sigma
        return F.cross_entropy(engine(noisy), y.repeat_interleave(m, dim=0))
