"""Training objectives (the outer loss of DAT, paper eq. 5), by name: ``madry``, ``mix``, ``trades``, ``smooth``.

Each lives with its attack in :mod:`dat_ds.attacks` (``objective.py``, ``trades.py``,
``smooth.py``); importing this module imports that package, so every registered objective is
there whatever was imported first.
"""
from .attacks.objective import OBJECTIVES, Madry, Mix, Objective, create, names
from .attacks.smooth import SmoothCE
from .attacks.trades import Trades, trades_loss

__all__ = ["OBJECTIVES", "Madry", "Mix", "Objective", "SmoothCE", "Trades", "create", "names", "trades_loss"]
