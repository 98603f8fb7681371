"""Validation of compressor settings: one line naming the setting and what is allowed."""
from __future__ import annotations

from typing import Optional, Sequence


def _check_int(name: str, value, low: int, high: Optional[int] = None, multiple: int = 1) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and \
        (high is None or value <= high) and value % multiple == 0
    if not ok:
        allowed = f"an integer from {low} to {high}" if high is not None else \
            f"a positive multiple of {multiple}" if multiple > 1 else f"an integer >= {low}"
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {allowed}")
    return value


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(choices)}")
    return value


