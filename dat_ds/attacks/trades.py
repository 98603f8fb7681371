"""TRADES (Zhang et al. 2019): the KL attack objective and the clean + beta KL training loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ATTACK_LOSSES, START_STD, LossFn
from .objective import OBJECTIVES, Objective


def kl_to(p_clean: torch.Tensor) -> LossFn:
    """``sum KL(p_clean || softmax(logits))``: the TRADES attack objective (labels unused)."""
    log_p = p_clean.clamp_min(1e-12).log()
    return lambda logits, _y: (p_clean * (log_p - F.log_softmax(logits, dim=1))).sum()


def _kl_loss(model, x) -> LossFn:
    with torch.no_grad():
        return kl_to(F.softmax(model(x), dim=1))


ATTACK_LOSSES["kl"] = _kl_loss
# The KL is 0 and flat at x itself (its gradient is 0, its sign too): an attack without a random
# start would return x. TRADES' reference code starts at x + 0.001 N(0, 1); so do attacks here.
START_STD["kl"] = 0.001


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """``CE(clean, y) + beta * mean_i KL(p_clean_i || p_adv_i)`` (batch-mean KL, as in TRADES)."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(logits_clean, y) + beta * kl


@OBJECTIVES.register("trades")
class Trades(Objective):
    """TRADES: clean cross-entropy plus ``beta`` times the KL between clean and adversarial outputs;
    any PGD-family attack then ascends the KL (``attack_loss = "kl"``)."""

    attack_loss = "kl"

    def __init__(self, beta: float = 6.0):
        if beta < 0:
            raise ValueError(f"--beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def loss(self, engine, x, x_adv, y):
        return trades_loss(engine(x), engine(x_adv), y, self.beta)
