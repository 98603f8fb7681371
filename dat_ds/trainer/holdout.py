"""FGSM safety: a held-out PGD/FGSM check per epoch, the best epoch kept, catastrophic overfitting flagged."""
from __future__ import annotations

import sys

from .. import attacks, dist
from ..evaluate import AttackSpec, evaluate


class OverfitWatch:
    """Keeps the best epoch by held-out PGD accuracy and flags catastrophic overfitting: PGD
    accuracy collapsing by ``co_drop`` from its best while FGSM accuracy rises (Wong et al. 2020,
    Rice et al. 2020)."""

    def __init__(self, co_drop: float):
        self.co_drop, self.best, self.best_epoch, self.last_fgsm = co_drop, -1.0, None, None

    def observe(self, epoch: int, pgd_acc: float, fgsm_acc: float) -> dict:
        improved = pgd_acc > self.best
        collapsed = (self.best - pgd_acc >= self.co_drop and self.last_fgsm is not None
                     and fgsm_acc > self.last_fgsm)
        if improved:
            self.best, self.best_epoch = pgd_acc, epoch
        self.last_fgsm = fgsm_acc
        return {"holdout_best": improved, "catastrophic_overfitting": collapsed}

    def state_dict(self) -> dict:
        return {"co_drop": self.co_drop, "best": self.best, "best_epoch": self.best_epoch, "last_fgsm": self.last_fgsm}

    def load_state_dict(self, state: dict) -> None:
        for key in ("co_drop", "best", "best_epoch", "last_fgsm"):
            if key in state:
                setattr(self, key, state[key])


def holdout_check(model, dataset, pgd: AttackSpec, eps: float, watch: OverfitWatch, epoch: int,
                  early_stop: bool, batch_size: int, seed: int, device, placement=None) -> dict:
    """PGD and FGSM accuracy on the held-out samples (the evaluation's definition: fp32, correct
    clean and attacked), and what the watch makes of them; ``placement``: each rank holds its
    folder's held-out samples and the figures count their union."""
    if dataset is None:
        return {}
    pgd_out = evaluate(model, dataset, pgd, device, batch_size, seed, placement=placement)
    fgsm = evaluate(model, dataset, AttackSpec(attacks.create("fgsm_rs", eps=eps), "fgsm_rs"), device, batch_size,
                    seed, placement=placement)
    out = {"holdout_pgd_acc": pgd_out["robust_acc"], "holdout_fgsm_acc": fgsm["robust_acc"],
           "holdout_clean_acc": pgd_out["clean_acc"]}
    out.update(watch.observe(epoch, out["holdout_pgd_acc"], out["holdout_fgsm_acc"]))
    if out["catastrophic_overfitting"] and dist.is_main():
        print(f"WARNING: catastrophic overfitting at epoch {epoch}: held-out PGD accuracy "
              f"{out['holdout_pgd_acc']:.3f} fell from {watch.best:.3f} while FGSM accuracy rose to "
              f"{out['holdout_fgsm_acc']:.3f}" + ("; stopping (best checkpoint kept)" if early_stop else ""),
              file=sys.stderr, flush=True)
    return out
