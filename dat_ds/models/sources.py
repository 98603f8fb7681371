"""Backbone sources: where ``--backbone`` names come from (``timm:NAME``, ``transformers:PATH``).

A source is one class registered in :data:`SOURCES`; it names, builds, rebuilds from a
checkpoint and exports its backbones. A name without a known ``SOURCE:`` prefix is a timm name.
Adding a source is one module that subclasses :class:`BackboneSource` and registers it:

    >>> @SOURCES.register("mine")                                  # doctest: +SKIP
    ... class Mine(BackboneSource):
    ...     def check(self, name): ...
    ...     def create(self, name, num_classes, in_chans, img_size, mean, std, **kw): ...
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..registry import Registry
from .normalize import NormalizedModel

SOURCES = Registry("backbone source")
DEFAULT_SOURCE = "timm"
STEMS = ("auto", "small", "native")


class BackboneSource:
    """How one family of backbones is checked, built, rebuilt and exported."""
    usage = "SOURCE:NAME"  # how --backbone spells it, for help and error lines

    def check(self, name: str) -> None:
        """``ValueError`` (one line) when ``name`` cannot be built; no weights are loaded."""
        raise NotImplementedError

    def create(self, name: str, num_classes: int, in_chans: int, img_size: int, mean: Sequence[float],
               std: Sequence[float], pretrained: Optional[bool] = None, stem: str = "auto",
               class_names: Optional[Sequence[str]] = None, **kwargs) -> NormalizedModel:
        """A model for ``in_chans x img_size x img_size`` inputs in [0, 1]."""
        raise NotImplementedError

    def rebuild(self, name: str, meta: dict, weights: dict) -> NormalizedModel:
        """The architecture a checkpoint's ``weights`` fit (its ``meta`` as recorded), weights not loaded."""
        return self.create(name, meta["num_classes"], meta["in_chans"], meta["img_size"], meta["mean"],
                           meta["std"], stem=meta.get("stem") or "auto")

    def export(self, name: str, model: NormalizedModel, meta: dict, out: Path) -> str:
        """Write the weights in the source's own format under ``out``; returns one line saying what."""
        raise NotImplementedError


def split_backbone(backbone: str) -> Tuple[str, str]:
    """``(source, name)``: ``"transformers:./vit"`` -> ``("transformers", "./vit")``, ``"resnet18"`` -> timm."""
    prefix, sep, rest = backbone.partition(":")
    if sep and prefix in SOURCES:
        return prefix, rest
    return DEFAULT_SOURCE, backbone


def source_of(backbone: str) -> Tuple[BackboneSource, str]:
    """The source object for ``backbone`` and the name it takes."""
    prefix, name = split_backbone(backbone)
    if not name:
        raise ValueError(f"--backbone {backbone!r} names no model after '{prefix}:'")
    return SOURCES.create(prefix), name


def check_backbone(name: str) -> None:
    """``ValueError`` (one line) when ``name`` is no backbone of any source (config validation)."""
    source, ident = source_of(name)
    source.check(ident)


def check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
