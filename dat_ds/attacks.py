"""Inner-maximization oracles: the attacks that make adversarial examples.

Every attack works in [0, 1] pixel space (normalization lives inside the model), takes input
gradients only (``torch.autograd.grad`` w.r.t. the perturbation, never ``.backward()`` on
parameters) and must be given ``engine.module``, never the DeepSpeed engine itself: the
engine's forward installs backward hooks that an input-gradient pass would disturb.

    >>> from dat_ds import attacks
    >>> pgd = attacks.create("pgd", eps=8 / 255, alpha=2 / 255, steps=10)
    >>> x_adv = pgd.perturb(model, x, y)            # doctest: +SKIP

| name | threat model | rule |
|---|---|---|
| ``none`` | - | natural training: ``x`` unchanged |
| ``noise`` | Linf | uniform noise in the ball: the baseline every attack must beat |
| ``pgd`` | Linf | PGD-k with random start (Madry et al. 2017) |
| ``pgd_l2`` | L2 | PGD-k with normalized steps and a random start in the ball |
| ``fgsm_rs`` | Linf | one step of 1.25 eps from a uniform start (Wong et al. 2020) |
| ``free`` | Linf | Free-m (Shafahi et al. 2019): minibatch replay, see :class:`Free` |
| ``conadv`` | Linf | perturbations from stale weights (ConAdv), see :class:`ConAdv` |

``loss="kl"`` makes the PGD family maximize ``KL(f(x) || f(x + d))`` instead of the
cross-entropy (the TRADES inner problem). ``ATTACKS.names()`` drives ``--attack``.
"""
from __future__ import annotations

import abc
import contextlib
import copy
from collections import deque
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Registry

ATTACKS = Registry("attack")
BN_MODES = ("eval", "train")
LOSSES = ("ce", "kl")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sum_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A summed loss keeps every sample's gradient at full size; only its direction is used.
    return F.cross_entropy(logits, y, reduction="sum")


def kl_to(p_clean: torch.Tensor) -> LossFn:
    """``sum KL(p_clean || softmax(logits))``: the TRADES attack objective (labels unused)."""
    log_p = p_clean.clamp_min(1e-12).log()
    return lambda logits, _y: (p_clean * (log_p - F.log_softmax(logits, dim=1))).sum()


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


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = _sum_ce) -> torch.Tensor:
    """Gradient of ``loss_fn(model(x), y)`` w.r.t. the input ``x`` only."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(model(x), y), x)
    return g


def _box(x: torch.Tensor, eps: float):
    """Per-pixel bounds of ``delta`` for the Linf ball intersected with the [0, 1] box."""
    return (-x).clamp_(min=-eps), (1 - x).clamp_(max=eps)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
             random_start: bool = True, loss_fn: LossFn = _sum_ce) -> torch.Tensor:
    """PGD-k under Linf (Madry et al. 2017): ``d <- clip(d + alpha * sign(grad_d L(x + d)))``.

    Returns ``x + d`` with ``|d|_inf <= eps`` and ``x + d`` in [0, 1]. With ``steps=1`` and
    ``alpha=1.25 eps`` this is FGSM-RS (Wong et al. 2020).
    """
    x = x.detach()
    lo, hi = _box(x.clone(), eps)
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    delta = torch.max(torch.min(delta, hi), lo)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
        delta = delta.detach().add_(g.sign_(), alpha=alpha)
        delta = torch.max(torch.min(delta, hi, out=delta), lo, out=delta)
    return (x + delta).detach()


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def project_l2(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L2 ball of radius ``eps``, then into the [0, 1] box (which only shrinks it)."""
    delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp_(0, 1) - x


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
           random_start: bool = True, loss_fn: LossFn = _sum_ce) -> torch.Tensor:
    """PGD-k under L2: ``d <- proj(d + alpha * g / ||g||_2)`` per sample; random start in the ball."""
    x = x.detach()
    if random_start:
        delta = torch.randn_like(x)
        radius = torch.rand(len(x), *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype) * eps
        delta = project_l2(delta / _per_sample_norm(delta) * radius, x, eps)
    else:
        delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
        delta = project_l2(delta.detach() + alpha * g / _per_sample_norm(g), x, eps)
    return (x + delta).detach()


def _check(name: str, value, low: float, allow_equal: bool = True) -> None:
    ok = value >= low if allow_equal else value > low
    if not ok:
        raise ValueError(f"{name} must be {'>=' if allow_equal else '>'} {low:g}, got {value}")


class Attack(abc.ABC):
    """Base class: ``perturb(model, x, y) -> x_adv`` inside the threat model and [0, 1]."""

    norm = "linf"
    uses_gradients = True

    def __init__(self, eps: float, bn_mode: str = "eval", loss: str = "ce"):
        _check("eps", eps, 0.0)
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
        if loss not in LOSSES:
            raise ValueError(f"attack loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.eps = float(eps)
        self.bn_mode = bn_mode
        self.loss = loss

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.uses_gradients:
            return self._perturb(model, x.detach(), y)
        with attack_mode(model, self.bn_mode):
            return self._perturb(model, x, y)

    def loss_fn(self, model: nn.Module, x: torch.Tensor) -> LossFn:
        """The objective the attack ascends: cross-entropy, or KL to the clean prediction."""
        if self.loss == "ce":
            return _sum_ce
        with torch.no_grad():
            return kl_to(F.softmax(model(x), dim=1))

    @abc.abstractmethod
    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's rule; runs inside :func:`attack_mode`."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


@ATTACKS.register("none")
class NoAttack(Attack):
    """Natural (non-adversarial) training: returns ``x`` unchanged."""

    uses_gradients = False

    def __init__(self, eps: float = 0.0, alpha: Optional[float] = None, steps: int = 0, bn_mode: str = "eval",
                 loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)

    def _perturb(self, model, x, y):
        return x


@ATTACKS.register("noise")
class UniformNoise(Attack):
    """Uniform noise in the Linf ball: the no-gradient baseline every attack must beat."""

    uses_gradients = False

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 0, bn_mode: str = "eval",
                 loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)

    def _perturb(self, model, x, y):
        return (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp_(0, 1)


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD-k, Linf, random start (Madry et al. 2017). ``alpha`` defaults to ``2.5 eps / steps``."""

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 10, random_start: bool = True,
                 bn_mode: str = "eval", loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)
        _check("steps", steps, 1)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        _check("alpha", self.alpha, 0.0, allow_equal=self.eps == 0)
        self.random_start = bool(random_start)

    def _perturb(self, model, x, y):
        return pgd_linf(model, x, y, self.eps, self.alpha, self.steps, self.random_start, self.loss_fn(model, x))


@ATTACKS.register("pgd_l2")
class PGDL2(PGD):
    """PGD-k under L2 (the Smooth-AT attack's base). ``alpha`` defaults to ``2.5 eps / steps``."""

    norm = "l2"

    def _perturb(self, model, x, y):
        return pgd_l2(model, x, y, self.eps, self.alpha, self.steps, self.random_start, self.loss_fn(model, x))


@ATTACKS.register("fgsm_rs")
class FGSMRS(PGD):
    """FGSM with random start (Wong et al. 2020): one step of ``alpha = 1.25 eps`` from a uniform start."""

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 1, bn_mode: str = "eval",
                 loss: str = "ce"):
        if steps != 1:
            raise ValueError(f"fgsm_rs takes exactly one step, got steps={steps}; use --attack pgd for more")
        super().__init__(eps, 1.25 * eps if alpha is None else alpha, 1, True, bn_mode, loss)


@ATTACKS.register("free")
class Free(Attack):
    """Free-m adversarial training (Shafahi et al. 2019): "adversarial training for free".

    In training, each minibatch is replayed ``steps`` (= m) times; ONE backward per replay gives
    the weight gradient (for the update) and the input gradient, which moves the perturbation
    ``d <- clip(d + alpha * sign(grad_x))`` (``alpha`` defaults to eps). ``d`` persists from one
    minibatch to the next, and a run makes ``epochs / m`` passes so the gradient count matches
    natural training. The trainer drives this through :meth:`adversarial_input` and
    :meth:`update`. As an evaluation attack, ``perturb`` runs the same m sign steps from zero.
    """

    replays_minibatch = True

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 4, bn_mode: str = "eval",
                 loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)
        _check("steps (replays m)", steps, 1)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else self.eps
        self._delta: Optional[torch.Tensor] = None

    def _perturb(self, model, x, y):
        return pgd_linf(model, x, y, self.eps, self.alpha, self.steps, False, self.loss_fn(model, x))

    def adversarial_input(self, x: torch.Tensor) -> torch.Tensor:
        """``clip_[0,1](x + d)`` as a leaf that collects the input gradient of the next backward."""
        if self._delta is None or self._delta.shape[1:] != x.shape[1:] or len(self._delta) < len(x):
            self._delta = torch.zeros_like(x)
        delta = self._delta[:len(x)]
        return (x + delta).clamp_(0, 1).requires_grad_(True)

    def update(self, x: torch.Tensor, x_adv: torch.Tensor) -> None:
        """``d <- clip_eps(d + alpha * sign(grad_x))`` from the gradient the training backward left."""
        if x_adv.grad is None:
            raise RuntimeError("Free-m: the training backward produced no input gradient")
        delta = self._delta[:len(x)]
        delta.add_(x_adv.grad.sign(), alpha=self.alpha).clamp_(-self.eps, self.eps)
        lo, hi = _box(x.clone(), self.eps)
        torch.max(torch.min(delta, hi, out=delta), lo, out=delta)

    def state_dict(self) -> dict:
        return {} if self._delta is None else {"delta": self._delta}

    def load_state_dict(self, state: dict) -> None:
        self._delta = state.get("delta")


@ATTACKS.register("conadv")
class ConAdv(PGD):
    """Concurrent adversarial training: perturbations from stale weights ``theta_{t - tau}``.

    The attack on batch t uses a snapshot of the weights from ``tau`` updates earlier, so it no
    longer depends on the update of step t - 1 and both can run at the same time. The trainer
    drives it with one batch of look-ahead: :meth:`launch` snapshots the current weights and
    attacks the next batch (on a second CUDA stream when the model is on a GPU, in sequence on
    the CPU: same arithmetic), :meth:`collect` returns the result. Defaults: tau 1, one
    FGSM-RS-style step of ``1.25 eps``. As an evaluation attack, ``perturb`` is plain PGD on the
    model it is given.
    """

    stale_weights = True

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 1, tau: int = 1,
                 random_start: bool = True, bn_mode: str = "eval", loss: str = "ce"):
        super().__init__(eps, 1.25 * eps / steps if alpha is None else alpha, steps, random_start, bn_mode, loss)
        _check("tau", tau, 1)
        self.tau = int(tau)
        self._attacker: Optional[nn.Module] = None
        self._history: deque = deque(maxlen=self.tau)
        self._stream = None

    def _snapshot(self, model: nn.Module) -> None:
        """Push ``theta_t`` and load ``theta_{t + 1 - tau}`` (the oldest kept) into the attacker."""
        if self._attacker is None:
            self._attacker = copy.deepcopy(model)
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        self._history.append([t.clone() for t in current] if self.tau > 1 else current)
        target = [t.data for t in (*self._attacker.parameters(), *self._attacker.buffers())]
        torch._foreach_copy_(target, self._history[0])

    def launch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Snapshot the weights and start attacking (x, y); returns a handle for :meth:`collect`."""
        if x.is_cuda:
            main = torch.cuda.current_stream(x.device)
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=x.device)
            self._stream.wait_stream(main)
            x.record_stream(self._stream)
            y.record_stream(self._stream)
            with torch.cuda.stream(self._stream):
                self._snapshot(model)
                copied = torch.cuda.Event()
                copied.record(self._stream)
                x_adv = self.perturb(self._attacker, x, y)
            main.wait_event(copied)  # the update may change the weights only once they are copied
            return x_adv, self._stream
        self._snapshot(model)
        return self.perturb(self._attacker, x, y), None

    def state_dict(self) -> dict:
        """The stale weights still to be used (tau > 1); with tau = 1 the next snapshot is the model itself."""
        return {"history": [list(h) for h in self._history]} if self.tau > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        self._history = deque((list(h) for h in state.get("history", [])), maxlen=self.tau)

    @staticmethod
    def collect(handle) -> torch.Tensor:
        x_adv, stream = handle
        if stream is not None:
            torch.cuda.current_stream(x_adv.device).wait_stream(stream)
            x_adv.record_stream(torch.cuda.current_stream(x_adv.device))
        return x_adv


def create(name: str, **kwargs) -> Attack:
    """Build a registered attack by name, e.g. ``create("pgd", eps=0.1, steps=10)``."""
    return ATTACKS.create(name, **kwargs)


def names():
    return ATTACKS.names()


# Randomized-smoothing attacks register themselves with this registry.
from . import smoothing  # noqa: E402,F401
