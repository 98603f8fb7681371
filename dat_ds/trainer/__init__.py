"""The DAT training loop (paper Algorithm 1), shared by every recipe.

| module | what |
|---|---|
| ``config.py`` | :class:`TrainConfig`: run settings, and each component as a name plus its settings |
| ``loop.py`` | :func:`train_epoch`: one step, one direction; the attack's step shape drives it |
| ``state.py`` | checkpoint state as typed pieces (:class:`ClientState`, :class:`RankState`), save and resume |
| ``holdout.py`` | the held-out PGD/FGSM check and catastrophic-overfitting watch |
| ``run.py`` | :func:`train`: setup, epoch loop, summary |
"""
from .config import TrainConfig
from .holdout import OverfitWatch
from .loop import EpochState, Totals, train_epoch, update
from .run import seed_everything, train

__all__ = ["EpochState", "OverfitWatch", "Totals", "TrainConfig", "seed_everything", "train", "train_epoch", "update"]
