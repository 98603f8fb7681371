"""Exponential moving average (EMA) of the weights, the model every strong AT recipe evaluates.

Turned on by the ds_config: ``"ema": {"decay": 0.999, "warmup": true}``. After every optimizer
step that was taken, ``ema.update()`` moves the shadow weights towards the live ones,
``shadow <- decay_t * shadow + (1 - decay_t) * weight``, in one ``torch._foreach_lerp_`` over
all parameters (no per-tensor Python loop, no host-device synchronisation), and copies the
buffers (BatchNorm running statistics) as they are, since those are already averages. With
``warmup`` the decay starts low and grows, ``decay_t = min(decay, (1 + t) / (10 + t))`` after
``t`` updates (TensorFlow's ``ExponentialMovingAverage(num_updates=t)``), so the early, random
weights are forgotten quickly.

timm's ``ModelEmaV3`` uses the same foreach kernels but keeps a deep copy of the module; a
DeepSpeed ``engine.module`` carries the engine's hooks, which a deep copy would drag along. Here
the shadows are plain fp32 tensors bound to the live module, and evaluation swaps them in::

    ema = create(engine.module, decay=0.999)
    ...  # after each optimizer step that was not skipped:
    ema.update()
    with ema.applied():  # the module holds the EMA weights inside, its own weights after
        evaluate(engine.module, ...)
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Iterator, List, Optional

import torch

from . import buffers

CONFIG_KEY = "ema"


class WeightEma:
    """EMA of ``module``'s parameters (fp32 shadows) plus a copy of its buffers.

    Bind it to the module that trains (``engine.module`` after ``deepspeed.initialize``, so the
    shadows live on the same device); ``state_dict()`` holds tensors only and loads with
    ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.999, warmup: bool = True):
        check_settings(decay=decay, warmup=warmup)
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.params: List[torch.Tensor] = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]
        buffers = list(module.named_buffers())
        self.buffer_names = [n for n, _ in buffers]
        self.buffers: List[torch.Tensor] = [b for _, b in buffers]
        self.shadow_buffers = [b.detach().clone() for b in self.buffers]
        self._same_dtype = all(p.dtype == torch.float32 for p in self.params)
        self._backup: Optional[list] = None

    def decay_at(self, t: int) -> float:
        """The decay of the update that follows ``t`` earlier ones."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, gate: Optional[torch.Tensor] = None) -> None:
        """One EMA step from the module's current weights (call after each optimizer step taken).

        ``gate``: a 0-dim float on the device (the step guard's deferred agreement), 0 leaves the
        average as it is; :meth:`unstep` then takes the count back once the host knows."""
        weight = 1.0 - self.decay_at(self.updates)
        live = [p.detach() for p in self.params]
        if gate is not None:  # a tensor weight (no host read): mul + add, as lerp takes a host scalar
            w = gate * weight
            torch._foreach_mul_(self.shadow, 1.0 - w)
            torch._foreach_add_(self.shadow, torch._foreach_mul(live, w))
        elif self._same_dtype:
            torch._foreach_lerp_(self.shadow, live, weight)
        else:  # lerp needs equal dtypes; mul + add promotes a bf16/fp16 weight inside the kernel
            torch._foreach_mul_(self.shadow, 1.0 - weight)
            torch._foreach_add_(self.shadow, live, alpha=weight)
        if self.buffers:
            torch._foreach_copy_(self.shadow_buffers, self.buffers)
        self.updates += 1

    def sync_buffers(self) -> None:
        """The shadow buffers (BatchNorm statistics) made identical on every rank, as the module's
        are before an evaluation or a save (:mod:`dat_ds.buffers`); the shadow weights already are."""
        buffers.pool(self.buffer_names, self.shadow_buffers)

    def unstep(self) -> None:
        """Take back the count of the last ``update`` (its gate was 0: it changed nothing)."""
        self.updates -= 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the EMA weights and buffers inside the block, its own ones after."""
        live = [p.detach() for p in self.params] + self.buffers
        if self._backup is None:  # allocated once: evaluation every epoch costs no new memory
            self._backup = [torch.empty_like(t) for t in live]
        with torch.no_grad():
            torch._foreach_copy_(self._backup, live)
            torch._foreach_copy_(live, self.shadow + self.shadow_buffers)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, self._backup)

    def state_dict(self) -> dict:
        """Tensors only: ``{"updates", "params": {name: t}, "buffers": {name: t}}``."""
        return {"updates": torch.tensor(self.updates, dtype=torch.int64),
                "params": {n: t.clone() for n, t in zip(self.names, self.shadow)},
                "buffers": {n: t.clone() for n, t in zip(self.buffer_names, self.shadow_buffers)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore bit for bit; a state of another model raises ``ValueError`` naming a tensor."""
        for key, names, targets in (("params", self.names, self.shadow),
                                    ("buffers", self.buffer_names, self.shadow_buffers)):
            saved = state.get(key, {})
            missing = [n for n in names if n not in saved] or sorted(set(saved) - set(names))
            if missing:
                raise ValueError(f"EMA state does not fit this model: {key} {missing[0]!r} differs")
            for name, target in zip(names, targets):
                if saved[name].shape != target.shape:
                    raise ValueError(f"EMA state does not fit this model: {name} has shape "
                                     f"{tuple(saved[name].shape)}, the model {tuple(target.shape)}")
            torch._foreach_copy_(targets, [saved[n].to(t.device) for n, t in zip(names, targets)])
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return f"WeightEma(decay={self.decay}, warmup={self.warmup}, updates={self.updates})"


def create(module: torch.nn.Module, decay: float = 0.999, warmup: bool = True) -> WeightEma:
    """The EMA of ``module``; the settings are those of the ds_config's ``"ema"`` block."""
    return WeightEma(module, decay=decay, warmup=warmup)


def settings() -> dict:
    """``{setting: default}`` of the ``"ema"`` block, read from :func:`create`'s signature."""
    return {p.name: p.default for p in inspect.signature(create).parameters.values() if p.name != "module"}


def check_settings(**given) -> None:
    """``ValueError`` naming the first bad setting of an ``"ema"`` block."""
    takes = settings()
    unknown = [k for k in given if k not in takes]
    if unknown:
        raise ValueError(f"ema has no setting {unknown[0]!r}; it takes: {', '.join(takes)}")
    decay = given.get("decay", takes["decay"])
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (math.isfinite(decay)
                                                                             and 0 <= decay < 1):
        raise ValueError(f"ema.decay must be a number in [0, 1), e.g. 0.999, got {decay!r}")
    if not isinstance(given.get("warmup", True), bool):
        raise ValueError(f"ema.warmup must be true or false, got {given['warmup']!r}")


def check_config(cfg: dict, where: str = "ds_config") -> None:
    """Check a ds_config's ``"ema"`` block (absent: no EMA); errors name ``where``."""
    spec = cfg.get(CONFIG_KEY)
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise ValueError(f'{where}: ema must be a JSON object such as {{"decay": 0.999}}, got {spec!r}')
    try:
        check_settings(**spec)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def from_config(cfg: dict, module: torch.nn.Module) -> Optional[WeightEma]:
    """The EMA the ds_config asks for, or None when it has no ``"ema"`` block."""
    check_config(cfg)
    spec = cfg.get(CONFIG_KEY)
    return None if spec is None else create(module, **spec)
