"""The QSGD payload's layout, shared by the fused codec (``qsgd_codec.py``) and the baseline
(``baseline.py``): the affine map of values to codes and the payload's size."""
from __future__ import annotations

import math
from typing import Tuple


def _qsgd_levels(bits: int) -> Tuple[float, float, int]:
    """(a, c, largest code) of the affine map t = a v / ||v|| + c."""
    if bits == 1:
        return 0.5, 0.5, 1
    s = 2 ** (bits - 1) - 1
    return float(s), float(s), 2 * s


def qsgd_bytes(numel: int, bits: int, bucket_size: int) -> int:
    """Payload bytes of ``numel`` values: one fp32 norm per bucket + ``bits`` per value."""
    return 4 * math.ceil(numel / bucket_size) + math.ceil(numel * bits / 8)
