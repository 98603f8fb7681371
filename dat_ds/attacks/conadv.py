"""Concurrent adversarial training (ConAdv): perturbations from stale weights."""
from __future__ import annotations

import copy
from collections import deque
from typing import Optional

import torch
import torch.nn as nn

from .. import dist
from ..speed import compile_like
from .base import ATTACKS, check
from .pgd import PGD
from .shapes import LookAhead

SIDE_STREAM = ("auto", "on", "off")
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the hooks a wrapper (DeepSpeed) registered on it: its
    forward pre-hook starts a throughput timer that synchronizes the device, which would make a
    side-stream attack wait for the main stream. Compiled where ``model`` is (a copy loses it)."""
    clone = compile_like(model, copy.deepcopy(model))
    for module in clone.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks is not None:
                hooks.clear()
    return clone


@ATTACKS.register("conadv")
class ConAdv(PGD):
    """ConAdv: the attack on minibatch t uses the weights of ``tau`` updates earlier.

    It then no longer depends on the update of step t - 1, and both may run at the same time: the
    step shape is :class:`~dat_ds.attacks.shapes.LookAhead`, which calls :meth:`launch` (snapshot
    the current weights, attack the next minibatch, on a second CUDA stream where that overlaps,
    else in sequence: same arithmetic) and :meth:`collect`. Checkpoint state: the ``tau - 1``
    older weight snapshots still to be used. As an evaluation attack, ``perturb`` is plain PGD on
    the model.

    Settings:
        tau: staleness of the attack's weights, in updates (1).
        steps, alpha: PGD steps (1) and step size (1.25 eps / steps).
        side_stream: auto, on or off: the attack on a second CUDA stream beside the update. auto:
            on a GPU of a multi-rank run, where the update waits on the gradient exchange and
            leaves the device to the attack; in sequence on one rank, where attack and update
            each fill the device and a second stream only adds contention (on an H200 a ConAdv
            step took 1.9 to 3.5 ms longer with it than its attack and update one after the other).
    """

    shape = LookAhead()
    reference_for_norm = False

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 1, tau: int = 1,
                 random_start: bool = True, bn_mode: str = "eval", loss: str = "ce", side_stream: str = "auto"):
        super().__init__(eps, 1.25 * eps / steps if alpha is None else alpha, steps, random_start, bn_mode, loss)
        check("tau", tau, 1)
        if side_stream not in SIDE_STREAM:
            raise ValueError(f"side_stream must be one of {', '.join(SIDE_STREAM)}, got {side_stream!r}")
        self.tau = int(tau)
        self.side_stream = side_stream
        self._attacker: Optional[nn.Module] = None
        self._history: deque = deque(maxlen=self.tau)
        self._stream = None

    def _snapshot(self, model: nn.Module) -> None:
        """Push ``theta_t`` and load ``theta_{t + 1 - tau}`` (the oldest kept) into the attacker."""
        if self._attacker is None:
            self._attacker = detached_copy(model)
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        self._history.append([t.clone() for t in current] if self.tau > 1 else current)
        target = [t.data for t in (*self._attacker.parameters(), *self._attacker.buffers())]
        torch._foreach_copy_(target, self._history[0])

    def overlaps(self, x: torch.Tensor) -> bool:
        """Whether the attack on ``x`` runs on a second CUDA stream (``side_stream``)."""
        return x.is_cuda and (self.side_stream == "on" or (self.side_stream == "auto" and dist.world_size() > 1))

    def launch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Snapshot the weights and start attacking (x, y); returns a handle for :meth:`collect`."""
        if self.overlaps(x):
            main = torch.cuda.current_stream(x.device)
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=x.device)
            self._stream.wait_stream(main)  # x, y and the weights are ready on the main stream
            x.record_stream(self._stream)
            y.record_stream(self._stream)
            with torch.cuda.stream(self._stream):
                start = torch.cuda.Event(enable_timing=True)
                start.record(self._stream)
                self._snapshot(model)
                copied = torch.cuda.Event()
                copied.record(self._stream)
                x_adv = self.perturb(self._attacker, x, y)
                end = torch.cuda.Event(enable_timing=True)
                end.record(self._stream)
            main.wait_event(copied)  # the update may change the weights only once they are copied
            return x_adv, self._stream, (start, end)
        self._snapshot(model)
        return self.perturb(self._attacker, x, y), None, None

    @staticmethod
    def collect(handle) -> torch.Tensor:
        """The adversarial batch of a :meth:`launch` handle ``(x_adv, stream, events)``, ready for
        the current stream."""
        x_adv, stream = handle[0], handle[1]
        if stream is not None:
            torch.cuda.current_stream(x_adv.device).wait_stream(stream)
            x_adv.record_stream(torch.cuda.current_stream(x_adv.device))
        return x_adv

    def state_dict(self) -> dict:
        """The stale weights still to be used (tau > 1); with tau = 1 the next snapshot is the model itself."""
        return {"history": [list(h) for h in self._history]} if self.tau > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        self._history = deque((list(h) for h in state.get("history", [])), maxlen=self.tau)
