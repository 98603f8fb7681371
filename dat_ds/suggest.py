"""Close matches for a misspelt name (a flag, a config key, a setting), for one-line errors."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


def close_match(word: str, choices: Iterable[str]) -> Optional[str]:
    """The choice closest to ``word`` when one is close enough, else None.

    >>> close_match("gradient_accumulation_step", ["gradient_accumulation_steps", "train_batch_size"])
    'gradient_accumulation_steps'
    """
    found = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str], quote: bool = True) -> str:
    """``" (did you mean 'X'?)"`` for the closest choice (unquoted for flags), or ``""`` when none is close."""
    match = close_match(word, choices)
    if match is None:
        return ""
    return f" (did you mean {match!r}?)" if quote else f" (did you mean {match}?)"
