"""Backbones with input normalization inside the model, from any registered backbone source.

Attacks work on [0, 1] pixels, so the model starts with a fixed ``(x - mean) / std`` layer whose
statistics are buffers saved with every checkpoint. ``--backbone`` takes a timm name
(``resnet18`` or ``timm:resnet18``; inputs up to 64 px get the CIFAR-style stem) or
``transformers:NAME_OR_PATH`` (any ``AutoModelForImageClassification``, a local folder or a hub
id). Sources live in :mod:`.sources`; each is one registered module.

Importing this package also registers the CIFAR backbones of the adversarial-training
literature with timm (``preactresnet18``, ``wrn28_10``, ...), so ``timm.create_model`` and
``--backbone`` find them by name.
"""
from __future__ import annotations

from typing import Optional, Sequence

from . import timm_source, transformers_source  # noqa: F401  (register the sources)
from .normalize import Normalize, NormalizedModel, normalization
from .sources import SOURCES, STEMS, BackboneSource, check_backbone, source_of, split_backbone
from .timm_source import SMALL_INPUT, class_names
from .zoo import PreActResNet, WideResNet

__all__ = ["Normalize", "NormalizedModel", "SOURCES", "STEMS", "SMALL_INPUT", "BackboneSource", "PreActResNet",
           "WideResNet", "check_backbone", "class_names", "create_model", "normalization", "rebuild_model",
           "source_of", "split_backbone"]


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), pretrained: Optional[bool] = None,
                 stem: str = "auto", class_names: Optional[Sequence[str]] = None, **kwargs) -> NormalizedModel:
    """A backbone for ``in_chans x img_size x img_size`` inputs in [0, 1].

    ``stem`` (timm): ``small`` swaps a strided first conv for a 3x3 stride-1 one and drops the
    stem max-pool (the CIFAR convention: more accurate, ~10x the compute on 28-32 px inputs),
    ``native`` keeps timm's stem, ``auto`` means ``small`` for inputs up to 64 px.
    ``pretrained``: ``None`` is the source's default (timm: random weights; transformers: the
    folder's or hub model's weights). ``class_names`` label the head where the source records them.

    >>> m = create_model("resnet18", num_classes=10, in_chans=1, img_size=28,
    ...                  mean=(0.286,), std=(0.353,))
    >>> m(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    source, ident = source_of(name)
    return source.create(ident, num_classes, in_chans, img_size, mean, std, pretrained=pretrained, stem=stem,
                         class_names=class_names, **kwargs)


def rebuild_model(meta: dict, weights: dict) -> NormalizedModel:
    """The architecture a checkpoint's ``weights`` fit, from its ``meta`` (weights not loaded)."""
    source, ident = source_of(meta["backbone"])
    return source.rebuild(ident, meta, weights)
