"""A tiny name -> factory registry, the pattern timm uses for models.

Attacks, compressors and optimizers each keep one. ``create(name, **kw)`` is the only way the
recipes build them, so CLI choices come straight from ``names()``.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List


class Registry:
    """Maps names to factories; unknown names and unknown settings raise ``ValueError``.

    >>> ATTACKS = Registry("attack")
    >>> @ATTACKS.register("noise")
    ... class Noise: ...
    >>> ATTACKS.names()
    ['noise']
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable:
        def wrap(factory: Callable) -> Callable:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory
        return wrap

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def create(self, name: str, **kwargs):
        factory = self.get(name)
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise ValueError(f"{self.kind} {name!r} has no setting(s) {', '.join(unknown)}; "
                                 f"it takes: {', '.join(p for p in params if p != 'self') or 'none'}")
        return factory(**kwargs)
