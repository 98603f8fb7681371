"""Inner-maximization oracles (the attacks that make adversarial examples) and the training objectives.

    >>> from dat_ds import attacks
    >>> pgd = attacks.create("pgd", eps=8 / 255, alpha=2 / 255, steps=10)
    >>> x_adv = pgd.perturb(model, x, y)            # doctest: +SKIP

One module per method, each registering itself:

| module | ``--attack`` / ``--loss`` | what |
|---|---|---|
| ``noise.py`` | ``none``, ``noise`` | natural training; uniform noise in the ball |
| ``pgd.py`` | ``pgd``, ``pgd_l2`` | PGD-k under Linf / L2 (Madry et al. 2017) |
| ``fgsm.py`` | ``fgsm_rs`` | one step of 1.25 eps from a uniform start (Wong et al. 2020) |
| ``free.py`` | ``free`` | Free-m (Shafahi et al. 2019), step shape ``Replay`` |
| ``conadv.py`` | ``conadv`` | perturbations from stale weights, step shape ``LookAhead`` |
| ``trades.py`` | loss ``trades`` | CE + beta KL, with the KL attack objective (Zhang et al. 2019) |
| ``smooth.py`` | ``smooth_pgd_l2``, loss ``smooth`` | Smooth-AT (Salman et al. 2019) |
| ``objective.py`` | loss ``madry``, ``mix`` | the objective registry and the CE losses |

``base.py`` holds the registry and the :class:`Attack` base class, ``shapes.py`` the step
shapes the training loop runs. A module added to this package registers itself on import (the
package imports every module it holds); code outside the package registers through
``ATTACKS.register`` / ``OBJECTIVES.register`` and is loaded with the recipes' ``--plugin``.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import ATTACK_LOSSES, ATTACKS, BN_MODES, Attack, attack_mode, create, name_of, names, reference_attack
from .objective import OBJECTIVES, Objective
from .shapes import LookAhead, Plain, Replay, StepContext, StepShape

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .conadv import ConAdv  # noqa: E402
from .fgsm import FGSMRS  # noqa: E402
from .free import Free  # noqa: E402
from .noise import NoAttack, UniformNoise  # noqa: E402
from .pgd import PGD, PGDL2, pgd_l2, pgd_linf, project_l2  # noqa: E402

__all__ = ["ATTACKS", "ATTACK_LOSSES", "BN_MODES", "OBJECTIVES", "Attack", "ConAdv", "FGSMRS", "Free",
           "LookAhead", "NoAttack", "Objective", "PGD", "PGDL2", "Plain", "Replay", "StepContext", "StepShape",
           "UniformNoise", "attack_mode", "create", "name_of", "names", "pgd_l2", "pgd_linf",
           "project_l2", "reference_attack"]
