"""Training objectives (the outer loss of DAT, paper eq. 5): the registry and the two CE losses.

An objective is called as ``objective(engine, x, x_adv, y) -> loss`` with the DeepSpeed engine,
so its forwards go through ``engine(...)`` and its backward through ``engine.backward``. It
names the loss its attack ascends (``attack_loss``, a key of ``ATTACK_LOSSES``) and declares
its settings in its signature.

| name | loss | module |
|---|---|---|
| ``madry`` | ``CE(f(x_adv), y)`` (Madry et al. 2017) | here |
| ``mix`` | ``(CE(f(x), y) + lam * CE(f(x_adv), y)) / (1 + lam)`` | here |
| ``trades`` | ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (Zhang et al. 2019) | ``trades.py`` |
| ``smooth`` | CE over noisy copies of ``x_adv`` (Salman et al. 2019) | ``smooth.py`` |
"""
from __future__ import annotations

import torch.nn.functional as F

from ..registry import Registry

OBJECTIVES = Registry("loss")


class Objective:
    attack_loss = "ce"  # what the inner maximization ascends

    def __call__(self, engine, x, x_adv, y):
        return self.loss(engine, x, x_adv, y)

    def loss(self, engine, x, x_adv, y):
        raise NotImplementedError


@OBJECTIVES.register("madry")
class Madry(Objective):
    """Cross-entropy on the adversarial examples."""

    def loss(self, engine, x, x_adv, y):
        return F.cross_entropy(engine(x_adv), y)


@OBJECTIVES.register("mix")
class Mix(Objective):
    """Clean plus ``lam`` times robust cross-entropy, normalised by ``1 + lam``."""

    def __init__(self, lam: float = 1.0):
        if lam < 0:
            raise ValueError(f"--lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def loss(self, engine, x, x_adv, y):
        clean = F.cross_entropy(engine(x), y)
        return (clean + self.lam * F.cross_entropy(engine(x_adv), y)) / (1 + self.lam)


def create(name: str, **kwargs) -> Objective:
    return OBJECTIVES.create(name, **kwargs)


def names():
    return OBJECTIVES.names()
