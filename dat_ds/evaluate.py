"""Clean and robust accuracy on a rank-sharded test set; counts are summed over ranks."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from . import dist
from .attacks import Attack


def accuracy_counts(model: nn.Module, loader: Iterable, attack: Optional[Attack],
                    device: torch.device) -> Dict[str, float]:
    """Correct predictions on clean and attacked inputs, summed over every rank's shard."""
    was_training = model.training
    model.eval()
    clean = robust = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            pred = model(x).argmax(1)
        clean += (pred == y).sum()
        if attack is not None:
            x_adv = attack.perturb(model, x, y)
            with torch.no_grad():
                robust += (model(x_adv).argmax(1) == y).sum()
        total += len(y)
    model.train(was_training)
    counts = dist.all_reduce_sum([float(clean), float(robust), float(total)], device)
    return {"correct_clean": counts[0], "correct_robust": counts[1], "n": counts[2]}


def evaluate(model: nn.Module, loader: Iterable, attack: Optional[Attack], device: torch.device) -> Dict[str, float]:
    """``clean_acc`` and (with an attack) ``robust_acc`` over the whole sharded test set."""
    c = accuracy_counts(model, loader, attack, device)
    n = max(c["n"], 1)
    out = {"clean_acc": c["correct_clean"] / n, "eval_samples": int(c["n"])}
    if attack is not None:
        out["robust_acc"] = c["correct_robust"] / n
    return out
