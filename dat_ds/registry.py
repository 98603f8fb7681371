"""A tiny name -> factory registry, the pattern timm uses for models.

Attacks, compressors, objectives, datasets, backbone sources and optimizers each keep one.
``create(name, **kw)`` is the only way the recipes build them, so CLI choices come straight
from ``names()``. A factory declares its settings once, in its signature: ``settings(name)``
reads them (minus the ones a factory marks ``internal_settings``, e.g. a random generator that
only code passes), the CLI derives its flags from them, and a setting the factory does not
take is an error.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List


class Registry:
    """Maps names to factories; unknown names and unknown settings raise ``ValueError``.

    >>> ATTACKS = Registry("attack")
    >>> @ATTACKS.register("noise")
    ... class Noise:
    ...     def __init__(self, eps: float = 0.1): ...
    >>> ATTACKS.names(), ATTACKS.settings("noise")
    (['noise'], {'eps': 0.1})
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

    def settings(self, name: str) -> Dict[str, Any]:
        """``{setting: default}`` a user may give the factory (``inspect.Parameter.empty``: required)."""
        factory = self.get(name)
        internal = set(getattr(factory, "internal_settings", ()))
        return {p.name: p.default for p in inspect.signature(factory).parameters.values()
                if p.name != "self" and p.name not in internal
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def setting_docs(self, name: str) -> Dict[str, str]:
        """``{setting: text}`` from the factory docstring's ``Settings:`` block: one entry per line,
        ``name: text`` or ``a, b: text``, continued on deeper-indented lines, ended by a blank line."""
        lines = (inspect.getdoc(self.get(name)) or "").splitlines()
        docs: Dict[str, str] = {}
        if "Settings:" not in lines:
            return docs
        names, indent = [], None
        for line in lines[lines.index("Settings:") + 1:]:
            if not line.strip():
                break
            depth = len(line) - len(line.lstrip())
            indent = depth if indent is None else indent
            head, sep, text = line.strip().partition(": ")
            if depth == indent and sep:
                names = [n.strip() for n in head.split(",")]
                for n in names:
                    docs[n] = text.strip()
            elif names:
                for n in names:
                    docs[n] += " " + line.strip()
        return docs

    def check_settings(self, name: str, given) -> None:
        """``ValueError`` naming the first of ``given`` that ``name`` does not take."""
        takes = self.settings(name)
        unknown = [k for k in given if k not in takes]
        if unknown:
            raise ValueError(f"{self.kind} {name!r} has no setting {unknown[0]!r}; "
                             f"it takes: {', '.join(takes) or 'none'}")

    def create(self, name: str, **kwargs):
        factory = self.get(name)
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise ValueError(f"{self.kind} {name!r} has no setting(s) {', '.join(unknown)}; "
                                 f"it takes: {', '.join(p for p in params if p != 'self') or 'none'}")
        return factory(**kwargs)
