"""timm backbones (the default source): any ``timm.list_models()`` name, plus dat-ds's CIFAR zoo.

Inputs up to :data:`SMALL_INPUT` px get the CIFAR-style stem (3x3 stride-1 first conv, no
max-pool) unless ``stem="native"``; ViT-like models get ``img_size`` (and, with the small stem,
``patch_size=4``) for the input.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

import timm
import torch.nn as nn

from .normalize import NormalizedModel, normalization, per_channel
from .sources import SOURCES, BackboneSource, check_stem
from .zoo import ZOO

SMALL_INPUT = 64  # inputs up to this size get a stride-1 stem
WEIGHTS = "model.safetensors"


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, leaf, new)


def small_input_stem(model: nn.Module) -> None:
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


def wants_small_stem(stem: str, img_size: int) -> bool:
    check_stem(stem)
    return stem == "small" or (stem == "auto" and img_size <= SMALL_INPUT)


def build(name: str, img_size: int, small: bool, **kw) -> Tuple[nn.Module, dict, bool]:
    """``(timm model, size arguments it took, stock)``; ``stock``: timm alone rebuilds it (no stem surgery)."""
    size_kw = {"img_size": img_size, **({"patch_size": 4} if small else {})}
    try:  # ViT-like models size their position embedding from img_size
        return timm.create_model(name, **size_kw, **kw), size_kw, True
    except TypeError as err:
        if "img_size" not in str(err) and "patch_size" not in str(err):
            raise
    model = timm.create_model(name, **kw)
    if small:
        small_input_stem(model)
    return model, {}, not small


@SOURCES.register("timm")
class TimmSource(BackboneSource):
    """Backbones by timm name; normalization with the dataset's statistics."""
    usage = "NAME or timm:NAME"

    def check(self, name: str) -> None:
        """ValueError naming similar models when ``name`` is not a timm (or dat-ds) model name;
        timm's ``local-dir:PATH`` (a folder with ``config.json``) and ``hf-hub:ID`` names pass."""
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):])
            if not (folder / "config.json").is_file():
                raise ValueError(f"backbone {name!r}: no config.json in {folder} (expected a folder timm saved, "
                                 f"e.g. by recipes/export.py or timm's push_to_hf_hub)")
            return
        if name.startswith("hf-hub:"):
            return
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name.split("_")[0] else []
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown backbone {name!r} (not a timm model name; other sources: "
                             f"{', '.join(SOURCES.get(s).usage for s in SOURCES.names() if s != 'timm')}){hint}")

    def create(self, name: str, num_classes: int, in_chans: int = 3, img_size: int = 224,
               mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), pretrained: Optional[bool] = None,
               stem: str = "auto", class_names: Optional[Sequence[str]] = None, **kwargs) -> NormalizedModel:
        small = wants_small_stem(stem, img_size)
        self.check(name)
        if pretrained and name in ZOO:
            raise ValueError(f"backbone {name!r} is a dat-ds model with no published weights: drop --pretrained")
        kw = dict(num_classes=num_classes, in_chans=in_chans, pretrained=bool(pretrained), **kwargs)
        try:
            backbone, _, _ = build(name, img_size, small, **kw)
        except OSError as err:  # hub unreachable or files missing (huggingface_hub's errors are OSErrors)
            if not pretrained:
                raise
            raise ValueError(f"--pretrained: timm could not load the weights of {name!r} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); offline, name a local folder "
                             f"as local-dir:PATH") from err
        return NormalizedModel(backbone, per_channel(mean, in_chans), per_channel(std, in_chans))

    def export(self, name: str, model: NormalizedModel, meta: dict, out: Path) -> str:
        """A folder plain timm loads (``model.safetensors`` + ``config.json``) when timm alone can
        rebuild the architecture; else dat-ds's weights, said in the returned line."""
        from safetensors.torch import save_file
        img_size, in_chans = meta["img_size"], meta["in_chans"]
        small = wants_small_stem(meta.get("stem") or "auto", img_size)
        norm, names = normalization(model), class_names(meta)
        info = {"input_size": [in_chans, img_size, img_size], **norm, "label_names": names}
        stock = False
        if name not in ZOO:
            probe, size_kw, stock = build(name, img_size, small, num_classes=meta["num_classes"], in_chans=in_chans)
        if not stock:
            return _export_dat_ds(model, meta, info, out / "dat_ds", name)
        folder = out / "timm"
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()}
        save_file(weights, str(folder / WEIGHTS), metadata={k: json.dumps(v) for k, v in info.items()})
        args = {"num_classes": meta["num_classes"], "in_chans": in_chans, **size_kw}
        cfg = dict(probe.pretrained_cfg)
        pretrained_cfg = {"input_size": info["input_size"], "mean": norm["mean"], "std": norm["std"],
                          "num_classes": meta["num_classes"], "crop_pct": 1.0, "interpolation": "bilinear",
                          "first_conv": cfg.get("first_conv"), "classifier": cfg.get("classifier"),
                          "fixed_input_size": bool(cfg.get("fixed_input_size", False))}
        config = {"architecture": name, "num_classes": meta["num_classes"],
                  "num_features": getattr(model.backbone, "num_features", None), "model_args": args,
                  "pretrained_cfg": pretrained_cfg, "label_names": names}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return f"timm/: {WEIGHTS} + config.json (timm.create_model({name!r}, pretrained=True, ...) or 'local-dir:')"


def _export_dat_ds(model: NormalizedModel, meta: dict, info: dict, folder: Path, name: str) -> str:
    """dat-ds's own weights (normalization included) for an architecture plain timm cannot rebuild."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS), metadata={k: json.dumps(v) for k, v in info.items()})
    build_kw = {"name": name, "num_classes": meta["num_classes"], "in_chans": meta["in_chans"],
                "img_size": meta["img_size"], "stem": meta.get("stem") or "auto"}
    (folder / "config.json").write_text(json.dumps({"dat_ds_create_model": build_kw, **info}, indent=2))
    why = "a dat-ds model, not in stock timm" if name in ZOO else "dat-ds's small stem (3x3 stride-1 first conv)"
    return (f"{name} is {why}: wrote dat_ds/{WEIGHTS} for dat_ds.models.create_model(**config['dat_ds_create_model']) "
            f"instead of a timm folder; model.pt2 needs no dat-ds")


def class_names(meta: dict) -> list:
    """The class names a checkpoint records, else its original class ids, else ``0..k-1``, as strings."""
    names = meta.get("class_names") or meta.get("classes") or range(meta["num_classes"])
    return [str(n) for n in names]
