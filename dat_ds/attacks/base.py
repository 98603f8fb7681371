"""What every attack shares: the registry, the base class, the attack mode and the losses it ascends.

An attack works in [0, 1] pixel space (normalization lives inside the model), takes input
gradients only (``torch.autograd.grad`` w.r.t. the perturbation, never ``.backward()`` on
parameters) and is given ``engine.module``, never the DeepSpeed engine itself: the engine's
forward installs backward hooks that an input-gradient pass would disturb.

An attack declares what the training loop needs to know about it instead of the loop asking
for its name: ``norm`` (its threat model), ``shape`` (how it turns minibatches into optimizer
steps, :mod:`dat_ds.attacks.shapes`), ``uses_gradients`` and ``single_step`` (one gradient step:
prone to catastrophic overfitting, so the held-out check is on by default).
"""
from __future__ import annotations

import abc
import contextlib
from typing import Callable, Dict, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry
from .shapes import Plain, StepShape

ATTACKS = Registry("attack")
BN_MODES = ("eval", "train")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# What the inner maximization ascends, by name: objectives name theirs (``Objective.attack_loss``).
# A loss factory gets (model, x) and returns ``loss_fn(logits, y)``.
ATTACK_LOSSES: Dict[str, Callable[[nn.Module, torch.Tensor], LossFn]] = {}
# Where an attack without a random start begins, by loss: x + std * N(0, 1) with the std given
# here, else x itself. A loss that is flat at x (TRADES' KL to the clean prediction: gradient 0,
# sign 0) would never leave it.
START_STD: Dict[str, float] = {}


def sum_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A summed loss keeps every sample's gradient at full size; only its direction is used.
    return F.cross_entropy(logits, y, reduction="sum")


ATTACK_LOSSES["ce"] = lambda model, x: sum_ce


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Run the attack with BatchNorm/Dropout in ``bn_mode`` and the weights frozen.

    ``eval`` (the default) uses running BatchNorm statistics, so the attack neither sees batch
    statistics of a half-made perturbation nor updates the running averages. ``train`` uses
    batch statistics (and updates running averages), as some reference AT code does. Freezing
    the weights keeps autograd from recording anything for weight gradients.
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


def box(x: torch.Tensor, eps: float):
    """Per-pixel bounds of ``delta`` for the Linf ball intersected with the [0, 1] box."""
    return (-x).clamp_(min=-eps), (1 - x).clamp_(max=eps)


def noise_like(x: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Random values shaped like ``x``, drawn in its logical order (``draw`` fills a contiguous
    tensor in place, e.g. ``lambda t: t.uniform_(-eps, eps)``) and laid out like ``x``: a seed gives
    the same values whatever ``x``'s memory format (channels-last batches included), for one copy
    of an input-sized tensor per attack when the formats differ."""
    noise = draw(torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return noise if x.is_contiguous() else torch.empty_like(x).copy_(noise)


def check(name: str, value, low: float, allow_equal: bool = True) -> None:
    ok = value >= low if allow_equal else value > low
    if not ok:
        raise ValueError(f"{name} must be {'>=' if allow_equal else '>'} {low:g}, got {value}")


class Attack(abc.ABC):
    """Base class: ``perturb(model, x, y) -> x_adv`` inside the threat model and [0, 1].

    Subclasses declare their settings in ``__init__``'s signature (the CLI is derived from it);
    ``loss`` is chosen by the training objective, not by the user.
    """

    norm = "linf"
    uses_gradients = True
    single_step = False
    shape: StepShape = Plain()
    # the attack of its norm that robust accuracy is measured with (PGD-k)
    reference_for_norm = False
    internal_settings = ("loss",)

    def __init__(self, eps: float, bn_mode: str = "eval", loss: str = "ce"):
        check("eps", eps, 0.0)
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
        if loss not in ATTACK_LOSSES:
            raise ValueError(f"attack loss must be one of {', '.join(ATTACK_LOSSES)}, got {loss!r}")
        self.eps = float(eps)
        self.bn_mode = bn_mode
        self.loss = loss

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.uses_gradients:
            return self._perturb(model, x.detach(), y)
        with attack_mode(model, self.bn_mode):
            return self._perturb(model, x, y)

    def loss_fn(self, model: nn.Module, x: torch.Tensor) -> LossFn:
        """The objective the attack ascends: cross-entropy, or e.g. KL to the clean prediction."""
        return ATTACK_LOSSES[self.loss](model, x)

    @property
    def start_std(self) -> float:
        """The spread of the start without a random start: ``START_STD`` of its loss, 0 (x itself) else."""
        return START_STD.get(self.loss, 0.0)

    @property
    def starts_at_random(self) -> bool:
        """Whether two calls on the same batch start from different points (a random start, or the small
        noise a loss starts from): what makes the copies of ``--views`` different adversarial examples."""
        return bool(getattr(self, "random_start", False)) or self.start_std > 0

    @abc.abstractmethod
    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's rule; runs inside :func:`attack_mode`."""

    def state_dict(self) -> dict:
        """State carried from step to step (tensors only); most attacks have none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {', '.join(state)}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def create(name: str, **kwargs) -> Attack:
    """Build a registered attack by name, e.g. ``create("pgd", eps=0.1, steps=10)``."""
    return ATTACKS.create(name, **kwargs)


def names():
    return ATTACKS.names()


def name_of(attack: Attack) -> str:
    """The registered name of ``attack``'s class."""
    return next(n for n in ATTACKS.names() if ATTACKS.get(n) is type(attack))


def reference_attack(norm: str, eps: float, steps: int) -> Attack:
    """PGD-``steps`` of threat model ``norm``: what ``robust_acc`` means in every summary."""
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        if getattr(cls, "reference_for_norm", False) and cls.norm == norm:
            return cls(eps=eps, steps=steps)
    raise ValueError(f"no reference attack is registered for norm {norm!r}")
