"""Randomized smoothing certification (Cohen et al. 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + n) = c)``, ``n ~ N(0, sigma^2 I)``, is
certifiably robust in L2: if the top class has probability ``pA >= pA_lower > 1/2``, then ``g``
keeps its prediction within radius ``sigma * PhiInv(pA_lower)``.

The attack and loss that train the base classifier for it (Smooth-AT) live in
:mod:`dat_ds.attacks.smooth` (``--attack smooth_pgd_l2 --loss smooth``); this module certifies.

Certification follows Cohen et al. (2019) exactly:

    >>> label, radius = certify(model, x, sigma=0.25, n0=100, n=100_000, alpha=0.001,
    ...                         batch_size=1000, seed=(0, index))      # doctest: +SKIP
    >>> label = predict(model, x, sigma=0.25, n=1000, alpha=0.001, batch_size=1000)  # doctest: +SKIP

The Monte Carlo draws are split across ranks when a process group of more than one rank is up,
and the class counts summed. The noise of draw batch ``k`` (draws ``[k b, (k + 1) b)`` for
``batch_size`` b) comes from a generator seeded by ``(seed, stream, k)``, never by the rank, so
a fixed ``(seed, n, batch_size)`` gives the same counts on any number of ranks.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn

from . import dist
from .attacks.smooth import SmoothCE, SmoothPGDL2, check_noise as _check_noise, smoothed_log_probs  # noqa: F401

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # where certify_summary.json reports certified accuracy
SELECT, ESTIMATE = 0, 1  # noise streams: the n0 draws that pick the class, the n draws that count it

Seed = Union[int, Sequence[int]]


# --- certification ----------------------------------------------------------------------------

def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion.

    The ``alpha`` quantile of ``Beta(k, n - k + 1)`` (0 for ``k = 0``): Cohen et al.'s
    ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``.

    >>> round(lower_confidence_bound(990, 1000, 0.001), 4)
    0.976
    """
    from scipy.stats import beta
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def radius_from_bound(p_lower: float, sigma: float) -> float:
    """Certified L2 radius ``sigma * PhiInv(p_lower)`` (Cohen et al. Theorem 1, with pB = 1 - pA)."""
    from scipy.stats import norm
    return float(sigma * norm.ppf(p_lower))


def batch_seed(seed: Seed, stream: int, k: int) -> int:
    """The generator seed of draw batch ``k`` of ``stream``: a hash of ``(seed..., stream, k)``."""
    parts = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if any(int(s) < 0 for s in parts):
        raise ValueError(f"seed must be non-negative, got {seed}")
    words = np.random.SeedSequence([*map(int, parts), stream, k]).generate_state(2, np.uint32)
    return int(words[0]) << 31 ^ int(words[1])


def rank_batches(num: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Tuple[int, int]]:
    """``(k, size)`` of the draw batches that ``rank`` of ``world_size`` evaluates, round robin."""
    for k in range(rank, math.ceil(num / batch_size), world_size):
        yield k, min(batch_size, num - k * batch_size)


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def local_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int, seed: Seed = 0,
                 stream: int = ESTIMATE, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Class counts of ``f(x + n)`` over the draw batches that ``rank`` of ``world_size`` owns."""
    if x.ndim != 3:
        raise ValueError(f"certify one input of shape (C, H, W), got shape {tuple(x.shape)}")
    with torch.no_grad():
        num_classes = model(x[None]).shape[1]
        counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
        gen = torch.Generator(device=x.device)
        for k, size in rank_batches(num, batch_size, rank, world_size):
            gen.manual_seed(batch_seed(seed, stream, k))
            noise = torch.randn((size, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
            counts += torch.bincount(model(x[None] + noise * sigma).argmax(1), minlength=num_classes)
    return counts


def sample_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int, seed: Seed = 0,
                  stream: int = ESTIMATE) -> torch.Tensor:
    """How often ``f(x + n)`` picks each class over ``num`` draws ``n ~ N(0, sigma^2 I)``.

    Returns int64 counts (one per class, on the CPU). With a process group of more than one
    rank, each rank evaluates its share of the draw batches and the counts are summed, so every
    rank must call this together. ``model`` should be in eval mode.
    """
    if not _distributed():
        return local_counts(model, x, sigma, num, batch_size, seed, stream).cpu()
    counts = local_counts(model, x, sigma, num, batch_size, seed, stream, dist.rank(), dist.world_size())
    tdist.all_reduce(counts)
    return counts.cpu()


def check_certify_settings(sigma: float, n: int, alpha: float, batch_size: int, n0: int = 1) -> None:
    """``ValueError`` naming the first bad certification setting."""
    _check_noise(sigma)
    for name, value in (("n0", n0), ("n", n), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics and no dropout while counting; the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def certify(model: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch_size: int,
            seed: Seed = 0) -> Tuple[int, float]:
    """CERTIFY of Cohen et al. (2019): ``(class, L2 radius)`` or ``(ABSTAIN, 0.0)``.

    ``n0`` draws guess the top class cA; ``n`` fresh draws count it; with ``pA_lower`` the
    one-sided Clopper-Pearson bound at level ``alpha``, returns ``(cA, sigma * PhiInv(pA_lower))``
    if ``pA_lower > 1/2`` and abstains otherwise. With probability ``>= 1 - alpha`` over the
    draws, a returned class is what the smoothed classifier predicts everywhere in the radius.
    """
    check_certify_settings(sigma, n, alpha, batch_size, n0)
    with _eval_mode(model):
        c_a = int(sample_counts(model, x, sigma, n0, batch_size, seed, SELECT).argmax())
        k = int(sample_counts(model, x, sigma, n, batch_size, seed, ESTIMATE)[c_a])
    p_lower = lower_confidence_bound(k, n, alpha)
    if p_lower <= 0.5:
        return ABSTAIN, 0.0
    return c_a, radius_from_bound(p_lower, sigma)


def predict(model: nn.Module, x: torch.Tensor, sigma: float, n: int, alpha: float, batch_size: int,
            seed: Seed = 0) -> int:
    """PREDICT of Cohen et al. (2019): the smoothed prediction, or ``ABSTAIN``.

    Counts ``n`` draws; returns the top class unless a two-sided binomial test of the top two
    counts (``p = 1/2``) has p-value above ``alpha``. A returned class differs from ``g(x)`` with
    probability at most ``alpha``.
    """
    from scipy.stats import binomtest
    check_certify_settings(sigma, n, alpha, batch_size)
    with _eval_mode(model):
        counts = sample_counts(model, x, sigma, n, batch_size, seed, ESTIMATE)
    order = torch.argsort(counts, descending=True, stable=True).tolist() + [None]
    n_a = int(counts[order[0]])
    n_b = int(counts[order[1]]) if order[1] is not None else 0
    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return order[0]


def certified_accuracy(radii: Sequence[float], correct: Sequence[bool], at: Sequence[float] = RADII) -> dict:
    """Share of samples predicted correctly with certified radius ``>= r``, for each ``r`` in ``at``."""
    r = np.asarray(radii, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    total = max(len(r), 1)
    return {f"{t:g}": float(np.sum(ok & (r >= t)) / total) for t in at}
