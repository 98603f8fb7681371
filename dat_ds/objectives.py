"""Training objectives (the outer loss of DAT, paper eq. 5).

An objective is called as ``objective(engine, x, x_adv, y) -> loss`` with the DeepSpeed engine,
so its forwards go through ``engine(...)`` and its backward through ``engine.backward``.

| name | loss | attack it pairs with |
|---|---|---|
| ``madry`` | ``CE(f(x_adv), y)`` (Madry et al. 2017) | CE |
| ``mix`` | ``CE(f(x), y) + lam * CE(f(x_adv), y)`` | CE |
| ``trades`` | ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (Zhang et al. 2019) | KL |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Registry

OBJECTIVES = Registry("loss")


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """``CE(clean, y) + beta * mean_i KL(p_clean_i || p_adv_i)`` (batch-mean KL, as in TRADES)."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(logits_clean, y) + beta * kl


class Objective:
    attack_loss = "ce"  # what the inner maximization ascends
    needs_clean = False

    def __call__(self, engine, x, x_adv, y):
        return self.loss(engine, x, x_adv, y)


@OBJECTIVES.register("madry")
class Madry(Objective):
    """Cross-entropy on the adversarial examples."""

    def loss(self, engine, x, x_adv, y):
        return F.cross_entropy(engine(x_adv), y)


@OBJECTIVES.register("mix")
class Mix(Objective):
    """Clean plus ``lam`` times robust cross-entropy, normalised by ``1 + lam``."""

    needs_clean = True

    def __init__(self, lam: float = 1.0):
        if lam < 0:
            raise ValueError(f"--lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def loss(self, engine, x, x_adv, y):
        clean = F.cross_entropy(engine(x), y)
        return (clean + self.lam * F.cross_entropy(engine(x_adv), y)) / (1 + self.lam)


@OBJECTIVES.register("trades")
class Trades(Objective):
    """TRADES: clean cross-entropy plus ``beta`` times the KL between clean and adversarial outputs."""

    attack_loss = "kl"
    needs_clean = True

    def __init__(self, beta: float = 6.0):
        if beta < 0:
            raise ValueError(f"--beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def loss(self, engine, x, x_adv, y):
        return trades_loss(engine(x), engine(x_adv), y, self.beta)


def create(name: str, **kwargs) -> Objective:
    return OBJECTIVES.create(name, **kwargs)


def names():
    return OBJECTIVES.names()
