"""Input normalization inside the model, so attacks work on fp32 [0, 1] pixels."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers, so checkpoints record them.

    A 1-channel input meets 3-channel statistics by broadcasting: the grey image is repeated to
    RGB, then normalized per channel (how an RGB backbone sees a grey dataset).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"normalization needs one positive std per mean, got mean={mean} std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.float()) * self.inv_std.float()


class NormalizedModel(nn.Module):
    """A backbone that takes fp32 [0, 1] images. ``model.backbone`` is the timm model (or the
    source's wrapper, which offers ``get_classifier()`` as timm models do).

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


def check_channels(backbone: str, model_chans: int, data_chans: int) -> None:
    """The data fits a backbone that declares ``model_chans`` input channels: the same number, or
    grey images repeated to RGB (what :class:`Normalize`'s 3-channel statistics do to a 1-channel
    input). Anything else is refused in one line: colour is not turned into grey behind the user's
    back, and grey is repeated only to RGB."""
    if data_chans == model_chans or (data_chans == 1 and model_chans == 3):
        return
    if data_chans == 3 and model_chans == 1:
        raise ValueError(f"backbone {backbone!r} takes grey images (num_channels=1) and the data is RGB; "
                         f"use a 3-channel model or a grey dataset (colour is not converted to grey)")
    raise ValueError(f"backbone {backbone!r} takes {model_chans}-channel images and the data has {data_chans} "
                     f"channel(s); only grey images are adapted, by repetition to 3 channels")


def per_channel(stats: Sequence[float], in_chans: int) -> tuple:
    """Statistics given once for all channels, repeated to ``in_chans`` values."""
    return tuple(stats) * in_chans if len(stats) == 1 and in_chans != 1 else tuple(stats)


def normalization(model: NormalizedModel) -> dict:
    """``{"mean": [...], "std": [...]}`` the model applies, read from its buffers."""
    mean = model.normalize.mean.flatten().tolist()
    std = (1.0 / model.normalize.inv_std.flatten()).tolist()
    return {"mean": [round(v, 6) for v in mean], "std": [round(v, 6) for v in std]}
