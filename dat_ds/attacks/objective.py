"""Training objectives (the outer loss of DAT, paper eq. 5): the registry and the two CE losses.

An objective is called as ``objective(engine, x, x_adv, y) -> loss`` with the DeepSpeed engine,
so its forwards go through ``engine(...)`` and its backward through ``engine.backward``. It
names the loss its attack ascends (``attack_loss``, a key of ``ATTACK_LOSSES``) and declares
its settings in its signature.

| name | loss | module |
|---|---|---|
| ``madry`` | ``CE(f(x_adv), y)`` (Madry et al. 2017) | here |
| ``mix`` | ``(CE(f(x), y) + lam * CE(f(x_adv), y)) / (1 + lam)`` | here |

Both take ``label_smoothing`` (0): the training targets put ``1 - s + s / C`` on the label and
``s / C`` on every other class (Szegedy et al. 2016). The attack still ascends plain CE. A model
trained with smoothed labels can look more robust to PGD than it is (its gradients flatten; Shafahi
et al. 2019): check such a model with AutoAttack.
| ``trades`` | ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (Zhang et al. 2019) | ``trades.py`` |
| ``smooth`` | CE over noisy copies of ``x_adv`` (Salman et al. 2019) | ``smooth.py`` |
"""
from __future__ import annotations

import torch.nn.functional as F

from ..registry import Registry

OBJECTIVES = Registry("loss")


class Objective:
    attack_loss = "ce"  # what the inner maximization ascends
    label_smoothing = 0.0

    def ce(self, logits, y):
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def __call__(self, engine, x, x_adv, y):
        return self.loss(engine, x, x_adv, y)

    def loss(self, engine, x, x_adv, y):
        raise NotImplementedError


@OBJECTIVES.register("madry")
class Madry(Objective):
    """Cross-entropy on the adversarial examples."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = _smoothing(label_smoothing)

    def loss(self, engine, x, x_adv, y):
        return self.ce(engine(x_adv), y)


@OBJECTIVES.register("mix")
class Mix(Objective):
    """Clean plus ``lam`` times robust cross-entropy, normalised by ``1 + lam``."""

    def __init__(self, lam: float = 1.0, label_smoothing: float = 0.0):
        if lam < 0:
            raise ValueError(f"--lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.label_smoothing = _smoothing(label_smoothing)

    def loss(self, engine, x, x_adv, y):
        clean = self.ce(engine(x), y)
        return (clean + self.lam * self.ce(engine(x_adv), y)) / (1 + self.lam)


def _smoothing(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {value}")
    return float(value)


def create(name: str, **kwargs) -> Objective:
    return OBJECTIVES.create(name, **kwargs)


def names():
    return OBJECTIVES.names()
