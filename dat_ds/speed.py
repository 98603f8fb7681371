"""How fast the model runs: the channels-last memory format and torch.compile (``--channels-last``,
``--compile``; each ``auto``, ``on`` or ``off``).

**channels_last** (NHWC) lets cuDNN's tensor-core convolutions run without transposing their
operands. :func:`prepare` converts the model's weights (``model.to(memory_format=...)``); the
batches take the same format where they reach the device (:func:`input_format`, read by the
training loop and the evaluation), so the attacks' perturbations, adversarial inputs and input
gradients keep it too (``empty_like``, ``x + delta`` and the convolutions' backward preserve
it): no step converts back and forth. ``auto``: on for convolutional backbones (2-d
convolutions hold most of the weights) on a GPU; off on the CPU (no tensor cores to feed) and
for transformers (a ViT's one convolution is its patch embedding).

**torch.compile** compiles the backbone inside the model (``NormalizedModel.backbone``) in place
(``nn.Module.compile``): ``engine.forward`` and the attacks, which run on ``engine.module``, call
the same compiled code; DeepSpeed's forward hooks on ``engine.module`` stay outside the graph;
the state dict keeps its plain keys (no ``_orig_mod.`` prefix), so checkpoints load anywhere.
Graphs are compiled during the first epoch and its evaluation (training forward, attack with
frozen weights, evaluation without gradients, each at a first and then a dynamic batch size)
and reused after: no recompiles across steps, epochs, evaluations, or in a resumed run. A
deep copy (ConAdv's stale-weights attacker) loses the compiled call (``nn.Module`` drops it when
copied); :func:`compile_like` gives the copy its own. ``auto``: on on a GPU; off on the CPU (a
compile takes minutes there and saves little). A backbone that fails to compile runs eager
from then on, with one line on stderr naming the error.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

MODES = ("auto", "on", "off")
BACKEND = "inductor"  # torch.compile's backend (tests use cheaper ones)
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException,)
# cache entries one compiled code object may hold: training, attack and evaluation graphs, each
# static then dynamic in the batch, under autocast and in fp32, with and without SyncBatchNorm
RECOMPILE_LIMIT = 32


def check_mode(flag: str, value: str) -> None:
    if value not in MODES:
        raise ValueError(f"--{flag} must be one of {', '.join(MODES)}, got {value!r}")


@dataclass
class Speed:
    """What :func:`prepare` made of the two settings, as the run's summary records it."""
    channels_last: bool
    compiled: bool
    backend: Optional[str] = None

    def as_dict(self) -> dict:
        return {"channels_last": self.channels_last, "compiled": self.compiled, "compile_backend": self.backend}


def convolutional(model: nn.Module) -> bool:
    """True when 2-d convolutions hold most of the model's weights (a ResNet, a WideResNet; not a ViT)."""
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    return conv > 0.5 * sum(p.numel() for p in model.parameters())


def wants_channels_last(mode: str, model: nn.Module, device: torch.device) -> bool:
    check_mode("channels-last", mode)
    if mode == "on" and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ValueError("--channels-last on: the backbone has no 2-d convolution to lay out channels-last; "
                         "use --channels-last auto or off")
    return mode == "on" or (mode == "auto" and device.type == "cuda" and convolutional(model))


def wants_compile(mode: str, device: torch.device) -> bool:
    check_mode("compile", mode)
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def prepare(model: nn.Module, channels_last: str = "auto", compile: str = "auto",
            device: Optional[torch.device] = None, backend: Optional[str] = None) -> nn.Module:
    """``model`` in the memory format and compiled as the settings ask, for a run on ``device``
    (where DeepSpeed will put it); in place, returned for chaining."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if wants_channels_last(channels_last, model, device):
        model.to(memory_format=torch.channels_last)
    if wants_compile(compile, device):
        compile_in_place(compiled_part(model), backend or BACKEND)
    return model


def compiled_part(model: nn.Module) -> nn.Module:
    """The module compiled: the backbone of a :class:`~dat_ds.models.NormalizedModel` (its
    normalization and dtype casts stay eager, beside DeepSpeed's hooks), else the model."""
    return getattr(model, "backbone", model)


def compile_in_place(module: nn.Module, backend=None) -> None:
    """``module``'s call compiled (in place: no wrapper module, plain state-dict keys)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    module._compiled_call_impl = CompiledCall(module, backend or BACKEND)


class CompiledCall:
    """``module``'s call through ``torch.compile``; on a compile error, one line on stderr and
    eager from then on (this call included)."""

    def __init__(self, module: nn.Module, backend):
        self.module, self.backend = module, backend
        self.compiled = torch.compile(module._call_impl, backend=backend)

    def __call__(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except COMPILE_ERRORS as err:
            print(f"dat_ds: --compile: {type(self.module).__name__} cannot be compiled ({_reason(err)}); it runs "
                  f"eager", file=sys.stderr, flush=True)
            self.module._compiled_call_impl = None
            return self.module._call_impl(*args, **kwargs)


def _reason(err: BaseException) -> str:
    """The error's type and first line; a backend's failure is told by the error it raised."""
    err = getattr(err, "inner_exception", None) or err
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def compile_like(source: nn.Module, copy: nn.Module) -> nn.Module:
    """Compile the modules of ``copy`` (a deep copy of ``source``) that are compiled in ``source``."""
    for original, twin in zip(source.modules(), copy.modules()):
        call = original.__dict__.get("_compiled_call_impl")
        if isinstance(call, CompiledCall):
            compile_in_place(twin, call.backend)
    return copy


def describe(model: nn.Module) -> Speed:
    """The model's format and compilation, read from the model itself."""
    call = compiled_part(model).__dict__.get("_compiled_call_impl")
    compiled = isinstance(call, CompiledCall)
    backend = getattr(call.backend, "__name__", str(call.backend)) if compiled else None
    return Speed(input_format(model) == torch.channels_last, compiled, backend)


def input_format(model: nn.Module) -> torch.memory_format:
    """The memory format batches for ``model`` should have: channels-last when its convolution
    weights are laid out so (``prepare`` made them), else contiguous."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
    return torch.contiguous_format
