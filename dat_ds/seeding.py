"""The run's random streams: one seed for Python, NumPy and torch, and seeds derived from several numbers."""
from __future__ import annotations

import random
import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from several numbers (``SeedSequence``: no two tuples share a seed by arithmetic accident)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device's) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)

