"""Backbones by timm name, with input normalization inside the model.

Attacks work on [0, 1] pixels, so the model starts with a fixed ``(x - mean) / std`` layer whose
statistics are buffers saved with every checkpoint. Any timm name works; inputs smaller than
64 px get the usual CIFAR-style stem (3x3 stride-1 first conv, no max-pool), and ViT-like
models get ``img_size``/``patch_size`` set for the input.

Importing this module also registers the CIFAR backbones of the adversarial-training
literature with timm (``preactresnet18``, ``wrn28_10``, ...), so ``timm.create_model`` and
``--backbone`` find them by name.
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

SMALL_INPUT = 64  # inputs up to this size get a stride-1 stem


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers, so checkpoints record them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"normalization needs one positive std per mean, got mean={mean} std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.float()) * self.inv_std.float()


class NormalizedModel(nn.Module):
    """A backbone that takes fp32 [0, 1] images. ``model.backbone`` is the timm model.

    Inputs are normalised in fp32 and only then cast to the backbone's dtype (when DeepSpeed's
    ``bf16``/``fp16`` mode has cast the weights); logits come back as fp32. Attacks therefore
    keep their perturbation arithmetic in fp32 whatever the training precision.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.backbone.get_classifier().weight.dtype if hasattr(self.backbone, 'get_classifier') \
            else next(self.backbone.parameters()).dtype
        z = self.normalize(x.float())
        if dtype == torch.float32:
            return self.backbone(z)
        return self.backbone(z.to(dtype)).float()


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, leaf, new)


def _small_input_stem(model: nn.Module) -> None:
    """Swap a strided first conv for a 3x3 stride-1 one and drop the stem max-pool."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    for name in names:
        conv = _get(model, name)
        if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1) and "patch_embed" not in name:
            _set(model, name, nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None))
    for pool in ("maxpool", "stem.pool"):
        if isinstance(_get(model, pool), (nn.MaxPool2d, nn.AvgPool2d)):
            _set(model, pool, nn.Identity())


STEMS = ("auto", "small", "native")


def check_backbone(name: str) -> None:
    """ValueError naming similar models when ``name`` is not a timm (or dat-ds) model name."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown backbone {name!r} (not a timm model name){hint}")


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), pretrained: bool = False,
                 stem: str = "auto", **kwargs) -> NormalizedModel:
    """A timm backbone for ``in_chans x img_size x img_size`` inputs in [0, 1].

    ``stem``: ``small`` swaps a strided first conv for a 3x3 stride-1 one and drops the stem
    max-pool (the CIFAR convention: more accurate, ~10x the compute on 28-32 px inputs),
    ``native`` keeps timm's stem, ``auto`` means ``small`` for inputs up to 64 px.

    >>> m = create_model("resnet18", num_classes=10, in_chans=1, img_size=28,
    ...                  mean=(0.286,), std=(0.353,))
    >>> m(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    small = stem == "small" or (stem == "auto" and img_size <= SMALL_INPUT)
    check_backbone(name)
    if len(mean) != in_chans:
        mean, std = tuple(mean) * in_chans if len(mean) == 1 else mean, tuple(std) * in_chans if len(std) == 1 else std
    kw = dict(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    try:  # ViT-like models size their position embedding from img_size
        backbone = timm.create_model(name, img_size=img_size, **({"patch_size": 4} if small else {}), **kw)
    except TypeError as err:
        if "img_size" not in str(err) and "patch_size" not in str(err):
            raise
        backbone = timm.create_model(name, **kw)
        if small:
            _small_input_stem(backbone)
    return NormalizedModel(backbone, mean, std)


# --- CIFAR backbones of the adversarial-training literature -------------------------------

class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """PreAct-ResNet (He et al. 2016) with the 3x3 stride-1 stem used for 32x32 inputs."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3, width: int = 64,
                 drop_rate: float = 0.0, **_):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(_PreActBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.num_features = cin
        self.drop_rate = drop_rate
        self.fc = nn.Linear(cin, num_classes)

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return F.relu(self.bn(self.layers(self.conv1(x))))

    def forward_head(self, x, pre_logits: bool = False):
        x = F.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1), self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, self.drop_rate, self.training)
        return self.conv2(out) + skip


class WideResNet(PreActResNet):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016), the CIFAR robustness workhorse."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, **_):
        nn.Module.__init__(self)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(_WideBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, drop_rate))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.num_features = cin
        self.drop_rate = 0.0
        self.fc = nn.Linear(cin, num_classes)


def _cfg(model: nn.Module) -> nn.Module:
    model.pretrained_cfg = {"first_conv": "conv1", "classifier": "fc", "input_size": (3, 32, 32)}
    return model


@register_model
def preactresnet18(pretrained: bool = False, **kwargs) -> nn.Module:
    """PreAct-ResNet-18 for 32x32 inputs (Wong et al. 2020; Rice et al. 2020)."""
    return _cfg(PreActResNet((2, 2, 2, 2), **kwargs))


@register_model
def preactresnet18_w16(pretrained: bool = False, **kwargs) -> nn.Module:
    """PreAct-ResNet-18 at a quarter of the width: for CPU demos and tests."""
    return _cfg(PreActResNet((2, 2, 2, 2), width=16, **kwargs))


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> nn.Module:
    """WideResNet-28-10 (Madry et al. 2017; Zhang et al. 2019, TRADES)."""
    return _cfg(WideResNet(28, 10, **kwargs))


@register_model
def wrn34_10(pretrained: bool = False, **kwargs) -> nn.Module:
    """WideResNet-34-10 (Rice et al. 2020)."""
    return _cfg(WideResNet(34, 10, **kwargs))


@register_model
def wrn16_4(pretrained: bool = False, **kwargs) -> nn.Module:
    """WideResNet-16-4: a small member of the family for quick runs."""
    return _cfg(WideResNet(16, 4, **kwargs))
