"""The CIFAR backbones of the adversarial-training literature, registered with timm.

Importing this module registers ``preactresnet18``, ``preactresnet18_w16``, ``wrn28_10``,
``wrn34_10`` and ``wrn16_4``, so ``timm.create_model`` and ``--backbone`` find them by name.
They are dat-ds models: a process that does not import dat-ds does not know them.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

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


ZOO = ("preactresnet18", "preactresnet18_w16", "wrn28_10", "wrn34_10", "wrn16_4")  # not in stock timm
