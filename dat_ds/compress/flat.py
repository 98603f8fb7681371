"""One persistent flat fp32 gradient buffer: every parameter's ``.grad`` is a view into it.

The idea of DDP's ``gradient_as_bucket_view``: backward accumulates straight into the buffer,
so the exchange reads and writes it in place; neither the fp32 all-reduce nor a codec flattens
or unflattens per step.

    stats = compress.exchange(engine, compressor)   # after engine.backward, at a boundary

The first exchange allocates the buffer (with the compressor's padding), copies the gradients
into it and rebinds each ``.grad`` to its view. DeepSpeed's ZeRO-0 ``engine.zero_grad`` sets
every ``.grad`` to None after each step (``_take_model_step``), which would drop the views; the
engine's ``zero_grad`` is therefore replaced, on this engine only, by a zeroing of the buffer
that keeps the views. Whenever a ``.grad`` is no longer its view (something else set it to None
or replaced it), the next exchange copies it in and rebinds it: correct, one copy slower.

A parameter without a gradient (unused in the forward) keeps a zeroed slice in the exchange, so
that the layout stays the same, but leaves it with no ``.grad``: the optimizer skips it, as it
would without the buffer (a compressor may well turn a zero slice into something else, e.g.
``sign_vote``'s coin votes or ``ef_sign``'s bucket scale, and weight decay or momentum would
move a zero gradient's parameter). Like the gradient-list path, whose layout depends on it,
this assumes that a parameter has no gradient on every rank or on none (the same model and
forward on every rank).

Only fp32 parameters on one device, with DeepSpeed's fp16/bf16 modes off, get the buffer; any
other engine exchanges through ``compressor.all_reduce_`` on the gradient list (fp32 on the
wire). Checkpoints hold no gradients: a resumed engine attaches a fresh buffer on its first
exchange, and parameters, optimizer and compressor state resume bit for bit.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .base import Compressor
from .collectives import CommStats, _world

ATTR = "_dat_ds_flat_grads"


class FlatGrads:
    """The buffer and the parameters whose ``.grad`` views it, in ``parameters()`` order."""

    def __init__(self, params: List[torch.nn.Parameter], room: int):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.shapes = [p.shape for p in params]
        self.buffer = torch.zeros(max(room, self.numel), dtype=torch.float32, device=params[0].device)
        self.views = []
        offset = 0
        for p in params:
            self.views.append(_view_like(self.buffer, offset, p))
            offset += p.numel()
        self.unused: List[int] = []

    def attach(self) -> None:
        """Make every ``.grad`` its view: copy in a gradient that lives elsewhere, zero the view
        of a parameter without one (and remember it, so that it goes back to None)."""
        self.unused = []
        for i, (p, view) in enumerate(zip(self.params, self.views)):
            grad = p.grad
            if grad is view or (grad is not None and grad.data_ptr() == view.data_ptr()
                                and grad.shape == view.shape):
                continue
            if grad is None:
                view.zero_()
                self.unused.append(i)
            else:
                view.copy_(grad)
            p.grad = view

    def drop_unused(self) -> None:
        """After the exchange: the parameters that had no gradient get none again (not the
        exchanged values of their zeroed slice), so the optimizer leaves them alone."""
        for i in self.unused:
            self.params[i].grad = None

    def zero_grad(self) -> None:
        """Zero the gradients, keeping the views (``engine.zero_grad``'s replacement)."""
        self.buffer.zero_()
        self.drop_unused()
        for p, view in zip(self.params, self.views):
            if p.grad is not None and p.grad is not view:
                p.grad = None


def _view_like(buffer: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """``p.numel()`` values of ``buffer`` from ``offset``, shaped and strided like ``p`` (a
    channels-last weight gets a channels-last gradient, which backward then fills in place)."""
    dense = p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)
    if p.dim() == 4 and dense:
        return buffer.as_strided(p.shape, p.stride(), offset)
    return buffer[offset:offset + p.numel()].view_as(p)


def _eligible(engine, params) -> bool:
    mixed = any(getattr(engine, f, lambda: False)() for f in ("fp16_enabled", "bfloat16_enabled"))
    return bool(params) and not mixed and all(p.dtype == torch.float32 for p in params) \
        and len({p.device for p in params}) == 1


def flat_grads(engine, compressor: Compressor) -> Optional[FlatGrads]:
    """The engine's ``FlatGrads`` (made on first use), or None where it does not apply."""
    module = engine.module
    params = [p for p in module.parameters() if p.requires_grad]
    flat = getattr(engine, ATTR, None)
    if flat is None or [id(p) for p in flat.params] != [id(p) for p in params]:
        if not _eligible(engine, params):
            return None
        world, _ = _world()
        flat = FlatGrads(params, compressor.padded_numel(sum(p.numel() for p in params), world))
        setattr(engine, ATTR, flat)
        engine.zero_grad = flat.zero_grad     # instance attribute: DeepSpeed's step calls self.zero_grad()
    elif flat.buffer.numel() < compressor.padded_numel(flat.numel, _world()[0]):
        old = flat
        flat = FlatGrads(old.params, compressor.padded_numel(old.numel, _world()[0]))
        for p, view in zip(old.params, old.views):
            if p.grad is view:
                p.grad = view.clone()      # copied into the new buffer by attach()
        setattr(engine, ATTR, flat)
        engine.zero_grad = flat.zero_grad
    return flat


def exchange(engine, compressor: Compressor) -> CommStats:
    """Average the engine's gradients over ranks through ``compressor``, in the flat buffer
    (call after ``engine.backward``, at an accumulation boundary)."""
    flat = flat_grads(engine, compressor)
    if flat is None:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        return compressor.all_reduce_(grads)
    flat.attach()
    stats = compressor.all_reduce_flat_(flat.buffer, flat.numel, flat.shapes)
    flat.drop_unused()
    return stats
