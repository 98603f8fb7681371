"""Which top-level ds_config keys DeepSpeed reads, found by running DeepSpeed's own config parser.

DeepSpeed ignores a key it does not know, so a typo (``"gradient_accumulation_step"``) would
train with the default and exit 0. Rather than keep a hand list that drifts from the installed
DeepSpeed, :func:`deepspeed_reads` hands its ``DeepSpeedConfig`` a dict that records every key
it looks up; what it never looks up, it ignores. The same pass surfaces DeepSpeed's own
refusals (a removed block such as ``"elasticity"``, an unknown key inside ``"zero_optimization"``)
as one line, before any rank starts.

    >>> "gradient_accumulation_steps" in deepspeed_reads({"train_micro_batch_size_per_gpu": 8})  # doctest: +SKIP
    True
"""
from __future__ import annotations

import functools
import logging
import typing
from typing import Iterable, Optional, Set
from unittest import mock

from .suggest import did_you_mean

# Keys dat-ds reads itself and takes out before DeepSpeed sees the config.
OWN_KEYS = ("optimizer", "scheduler", "ema")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class _Recorder(dict):
    """A dict that notes every key looked up in it (``get``, ``[]``, ``in``, ``keys()``)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.read: Set[str] = set()
        self.last: Optional[str] = None  # the last key whose value was fetched (a section being parsed)

    def _note(self, key, fetched: bool = False):
        self.read.add(key)
        if fetched:
            self.last = key

    def __getitem__(self, key):
        self._note(key, True)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key, True)
        return super().get(key, default)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def keys(self):
        return _RecordingKeys(self)

    def __copy__(self):  # DeepSpeedConfig parses a copy: keep recording
        return self


class _RecordingKeys:
    def __init__(self, owner: _Recorder):
        self.owner = owner

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self):
        return len(self.owner)


class _OneRank:
    """``deepspeed.comm`` as a one-rank world sees it, so the parser takes its usual path."""

    @staticmethod
    def get_rank(group=None):
        return 0

    @staticmethod
    def get_world_size(group=None):
        return 1


def _parse(cfg: dict) -> _Recorder:
    """Run DeepSpeed's config parser over ``cfg``; returns the recorder (raises what DeepSpeed raises)."""
    from deepspeed.runtime import config as ds_config
    from deepspeed.utils import logger
    recorder = _Recorder(cfg)
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs its world size at INFO
    try:
        with mock.patch.object(ds_config, "dist", _OneRank()):
            ds_config.DeepSpeedConfig(recorder)
    finally:
        logger.setLevel(level)
    return recorder


@functools.lru_cache(maxsize=1)
def _always_read() -> frozenset:
    """The keys DeepSpeed looks up for a minimal config (every section it knows)."""
    return frozenset(_parse({"train_micro_batch_size_per_gpu": 1}).read)


def deepspeed_version() -> str:
    import deepspeed
    return deepspeed.__version__


def deepspeed_reads(cfg: dict, where: str = "ds_config") -> frozenset:
    """Every top-level key DeepSpeed reads when given ``cfg`` (less dat-ds's own keys, with a
    one-rank batch); DeepSpeed's refusal of ``cfg`` raises a one-line ``ValueError``."""
    probe = {k: v for k, v in cfg.items() if k not in OWN_KEYS and k not in BATCH_KEYS}
    probe["train_micro_batch_size_per_gpu"] = 1  # the batch is checked against the ranks later
    recorder = _Recorder()
    try:
        recorder = _parse(probe)
    except Exception as err:  # pydantic's ValidationError, DeepSpeedConfigError, AssertionError
        raise ValueError(f"{where}: DeepSpeed {deepspeed_version()} refuses it: {_one_line(err, probe)}") from None
    return _always_read() | recorder.read


def _one_line(err: Exception, probe: dict) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic: name the section and the setting
        first = errors()[0]
        section = next((k for k, v in probe.items() if isinstance(v, dict) and first["loc"]
                        and first["loc"][0] in v), None)
        path = ".".join(str(p) for p in ((section,) if section else ()) + tuple(first["loc"]))
        hint = did_you_mean(str(first["loc"][-1]), _fields(getattr(err, "title", ""), first["loc"][:-1])) \
            if first.get("type") == "extra_forbidden" else ""
        return f"{path}: {first['msg']}{hint}"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _fields(model_name: str, path: tuple) -> Set[str]:
    """The settings (and their aliases) at ``path`` inside DeepSpeed's config model ``model_name``."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    models, model = [DeepSpeedConfigModel], None
    while models and model is None:
        candidate = models.pop()
        models.extend(candidate.__subclasses__())
        model = candidate if candidate.__name__ == model_name else None
    for part in path:
        info = model.model_fields.get(str(part)) if model is not None else None
        inner = [t for t in (info.annotation, *typing.get_args(info.annotation)) if isinstance(t, type)
                 and issubclass(t, DeepSpeedConfigModel)] if info is not None else []
        model = inner[0] if inner else None
    if model is None:
        return set()
    return {n for name, info in model.model_fields.items() for n in (name, info.alias) if n}


def check_keys(cfg: dict, where: str = "ds_config", own: Iterable[str] = OWN_KEYS) -> None:
    """``ValueError`` naming the first top-level key neither DeepSpeed nor dat-ds reads, with
    the closest known key; DeepSpeed's own refusals (removed blocks, bad sections) likewise."""
    known = deepspeed_reads(cfg, where) | set(own)
    for key in cfg:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}: neither DeepSpeed {deepspeed_version()} nor dat-ds "
                             f"reads it{did_you_mean(key, known)}")
