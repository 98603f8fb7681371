"""Robust transfer: fine-tune a DAT-pretrained backbone on a new set of classes.

The model is rebuilt as the checkpoint's architecture (backbone, stem, input channels and
resolution, normalization) with a fresh classifier head for the target classes; every other
tensor is copied from the checkpoint (:func:`load_backbone`). Target images reach the model at
the pre-training resolution and channel count (:class:`ResizedImages`: bilinear resize of
each batch, grey <-> RGB), as in the DAT paper's CIFAR-at-224-px transfer from ImageNet.

    >>> import torch
    >>> from dat_ds.data import TensorImages
    >>> ds = ResizedImages(TensorImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4)), 28, 3)
    >>> ds.__getitems__([0, 1])[0].shape
    torch.Size([2, 3, 28, 28])
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .checkpoint_io import read_states
from .data import DatasetInfo, read_batch

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for RGB -> grey


def adapt_batch(x: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """A float ``(B, C, H, W)`` batch in [0, 1] at ``img_size`` px with ``in_chans`` channels."""
    if x.shape[1] != in_chans:
        if x.shape[1] == 1:
            x = x.expand(-1, in_chans, -1, -1)
        elif x.shape[1] == 3 and in_chans == 1:
            x = (x * torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot map {x.shape[1]}-channel images to the checkpoint's {in_chans} channels")
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.contiguous()


class ResizedImages(Dataset):
    """Any image dataset, each batch resized to ``img_size`` and mapped to ``in_chans`` channels."""

    def __init__(self, base: Dataset, img_size: int, in_chans: int):
        self.base, self.img_size, self.in_chans = base, img_size, in_chans

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, idx: Sequence[int]):
        x, y = read_batch(self.base, idx)
        return adapt_batch(x, self.img_size, self.in_chans), y

    def subset(self, limit: Optional[int]) -> "ResizedImages":
        return ResizedImages(self.base.subset(limit), self.img_size, self.in_chans)

    def split_off(self, n: int):
        keep, held = self.base.split_off(n)
        return (ResizedImages(keep, self.img_size, self.in_chans),
                ResizedImages(held, self.img_size, self.in_chans) if held is not None else None)


def target_data(data: DatasetInfo, meta: dict, upsample: bool) -> DatasetInfo:
    """``data`` as the pre-trained model sees it: its resolution, channels and normalization. Resized
    data records its files' shape (``resized_from``), so an evaluation of the fine-tuned checkpoint
    resizes the same way (:func:`as_trained`)."""
    size, chans = meta["img_size"], meta["in_chans"]
    if data.img_size != size and not upsample:
        raise ValueError(f"{data.name} images are {data.img_size} px but the checkpoint was trained on {size} px; "
                         f"pass --upsample to resize them")
    if data.img_size == size and data.in_chans == chans:
        return replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    return replace(data, img_size=size, in_chans=chans, mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                   train=ResizedImages(data.train, size, chans), test=ResizedImages(data.test, size, chans),
                   resized_from=(data.in_chans, data.img_size))


def as_trained(data: DatasetInfo, meta: dict) -> DatasetInfo:
    """``data`` (the checkpoint's own dataset, as its files are) resized as the run that wrote the
    checkpoint resized it (``finetune.py --upsample`` records ``resized_from``); unchanged otherwise."""
    if not meta.get("resized_from") or (data.in_chans, data.img_size) != tuple(meta["resized_from"]):
        return data
    return target_data(data, meta, upsample=True)


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier head of a :class:`~dat_ds.models.NormalizedModel`."""
    head = model.backbone.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ValueError("the backbone has no classifier head to replace")


def load_backbone(model: nn.Module, model_file, meta: Optional[dict] = None) -> dict:
    """Copy every tensor of the checkpoint into ``model`` except the classifier head (left as built).

    Returns ``{"loaded": n, "skipped": [head keys of the checkpoint], "kept": [head keys of the model]}``;
    raises a one-line ValueError naming the checkpoint's backbone and the first mismatching key when
    the architectures differ.
    """
    state = read_states(Path(model_file))
    meta = meta or state["meta"]
    prefix = head_prefix(model)
    theirs = {k: v for k, v in state["module"].items() if not k.startswith(prefix)}
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    bad = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k].shape != theirs[k].shape)
    if bad:
        k = bad[0]
        why = ("missing from the checkpoint" if k not in theirs else "not in the model" if k not in ours
               else f"shape {tuple(theirs[k].shape)} in the checkpoint, {tuple(ours[k].shape)} in the model")
        raise ValueError(f"checkpoint {model_file} holds a {meta['backbone']!r} backbone (stem {meta.get('stem')!r}) "
                         f"that does not fit this model: {len(bad)} tensors differ, first {k} ({why})")
    model.load_state_dict(theirs, strict=False)
    return {"loaded": len(theirs), "skipped": sorted(k for k in state["module"] if k.startswith(prefix)),
            "kept": sorted(k for k in model.state_dict() if k.startswith(prefix))}
