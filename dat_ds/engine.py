"""Glue between dat-ds and the DeepSpeed engine.

The ds_config JSON owns batch size, precision, optimizer, schedule and ZeRO. dat-ds builds the
optimizer and schedule itself (``dat_ds.optim``: LAMB with the paper's layerwise adaptive LR
runs on CPU and GPU, DeepSpeed's FusedLamb is CUDA-only), passes everything else to
``deepspeed.initialize``, and turns DeepSpeed's backward all-reduce off: gradients cross ranks
only through a compressor (``dat_ds.compress``), which is timed and byte-counted.
"""
from __future__ import annotations

import inspect
import json
import math
from typing import Tuple

import torch

from . import config_keys, dist, ema
# Checkpoints live in dat_ds.checkpoint; these names stay importable from here.
from .checkpoint import (BEST, COMPLETE, LATEST, MODEL_KEYS, _safe_checkpoint_engine,  # noqa: F401
                         complete_checkpoints, latest_tag, load_checkpoint, load_error_reason, pick_checkpoint,
                         restore_best, rng_state, save_checkpoint, set_rng_state, verify_checkpoint)
from .compress import CommStats, Compressor
from .errors import ConfigError  # noqa: F401  (defined below both the engine and the checkpoints)
from .optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler
from .suggest import did_you_mean


def load_config(path: str) -> dict:
    """Read a ds_config JSON file and check what dat-ds relies on."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {err}") from None
    check_config(cfg, path)
    return cfg


def check_config(cfg: dict, where: str = "ds_config") -> None:
    """Every key of ``cfg`` is one DeepSpeed or dat-ds reads (a typo would otherwise be ignored), and
    every value dat-ds relies on is usable; the first problem raises :class:`ConfigError` naming it."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object {{...}}, got {type(cfg).__name__}")
    for key in ("zero_optimization", "fp16", "bf16"):
        if not isinstance(cfg.get(key, {}), dict):
            raise ConfigError(f"{where}: {key} must be a JSON object, got {cfg[key]!r}")
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{where}: fp16 and bf16 are both enabled; pick one")
    try:
        config_keys.check_keys(cfg, where)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage != 0:
        raise ConfigError(f"{where}: zero_optimization.stage={stage} is not supported; dat-ds reduces gradients "
                          f"through its own compressors, which needs ZeRO stage 0")
    check_no_float16(cfg, where)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    if not any(k in cfg for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        raise ConfigError(f"{where}: set train_micro_batch_size_per_gpu (the per-rank batch) or train_batch_size")
    try:
        ema.check_config(cfg, where)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    clip = cfg.get("gradient_clipping", 0.0)
    if not _is_number(clip) or clip < 0:
        raise ConfigError(f"{where}: gradient_clipping must be a number >= 0, got {clip!r}")
    _check_spec(cfg, "optimizer", OPTIMIZERS, where, {"type": "Lamb"}, ("model",))
    _check_spec(cfg, "scheduler", SCHEDULERS, where, None, ("optimizer", "steps_per_epoch", "epochs",
                                                             "global_batch_size"))


FLOAT16_NAMES = ("float16", "torch.float16", "fp16", "half")


def check_no_float16(cfg: dict, where: str) -> None:
    """float16 needs loss scaling, and a scaled gradient is not what a compressor should see:
    error-feedback residuals and momentum would be kept in scaled units (wrong whenever the scale
    changes) and each rank's scaler could decide differently about an overflow. bf16 needs no
    scaling and has fp32's range, so dat-ds trains in bf16 autocast or fp32."""
    autocast = cfg.get("torch_autocast", {})
    half = cfg.get("fp16", {}).get("enabled") or (
        isinstance(autocast, dict) and autocast.get("enabled") and str(autocast.get("dtype", "")) in FLOAT16_NAMES)
    if half:
        raise ConfigError(f'{where}: float16 training is not supported (its loss scaling would hand the gradient '
                          f'exchange scaled gradients); use "torch_autocast": {{"enabled": true, "dtype": '
                          f'"bfloat16"}} (ds_configs/lamb_bf16.json) or fp32')


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_spec(cfg: dict, key: str, registry, where: str, default, filled_in: tuple) -> None:
    """``{"type": NAME, "params": {...}}`` names a registered factory and only settings it takes;
    ``lr`` and ``weight_decay``, when given, are numbers in range."""
    spec = cfg.get(key, default)
    if spec is None:
        return
    if not isinstance(spec, dict) or not isinstance(spec.get("params", {}), dict):
        raise ConfigError(f'{where}: {key} must be {{"type": ..., "params": {{...}}}}, got {spec!r}')
    extra = [k for k in spec if k not in ("type", "params")]
    if extra:
        raise ConfigError(f'{where}: {key} has no key {extra[0]!r}{did_you_mean(extra[0], ("type", "params"))}; '
                          f'it takes "type" and "params"')
    name = spec.get("type", default["type"] if default else "WarmupPiecewise")
    if name not in registry:
        raise ConfigError(f"{where}: unknown {key} {name!r}; choose one of: {', '.join(registry.names())}")
    params = spec.get("params", {})
    takes = inspect.signature(registry.get(name)).parameters
    unknown = sorted(set(params) - set(takes) - set(filled_in))
    if unknown:
        settings = [p for p in takes if p not in filled_in]
        raise ConfigError(f"{where}: {key} {name!r} has no setting {unknown[0]!r}{did_you_mean(unknown[0], settings)}; "
                          f"it takes: {', '.join(settings)}")
    for field_, low, strict in (("lr", 0, True), ("weight_decay", 0, False), ("momentum", 0, False),
                                ("warmup_epochs", 0, False), ("gamma", 0, True)):
        if field_ in params:
            v = params[field_]
            if not _is_number(v) or v < low or (strict and v == low):
                raise ConfigError(f"{where}: {key}.params.{field_} must be a number {'>' if strict else '>='} "
                                  f"{low}, got {v!r}")


def resolve_batch(cfg: dict, world_size: int) -> Tuple[int, int, int]:
    """(micro batch per rank, gradient accumulation steps, global batch), DeepSpeed's rule.

    Setting ``train_micro_batch_size_per_gpu`` keeps the per-rank batch fixed, so the global
    batch grows with the number of ranks: the DAT setting.
    """
    micro = cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.get("gradient_accumulation_steps")
    total = cfg.get("train_batch_size")
    if micro and gas:
        total_expected = micro * gas * world_size
        if total and total != total_expected:
            raise ConfigError(f"train_batch_size={total} != micro {micro} x accumulation {gas} x {world_size} ranks")
        return micro, gas, total_expected
    if micro and total:
        if total % (micro * world_size):
            raise ConfigError(f"train_batch_size={total} is not divisible by micro {micro} x {world_size} ranks")
        return micro, total // (micro * world_size), total
    if micro:
        return micro, 1, micro * world_size
    gas = gas or 1
    if total % (gas * world_size):
        raise ConfigError(f"train_batch_size={total} is not divisible by accumulation {gas} x {world_size} ranks")
    return total // (gas * world_size), gas, total


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())


def check_precision(cfg: dict, model: torch.nn.Module) -> None:
    """DeepSpeed's bf16/fp16 modes cast every weight but keep buffers fp32, which BatchNorm
    cannot run with; such models train in mixed precision through ``torch_autocast``."""
    for mode in ("bf16", "fp16"):
        if cfg.get(mode, {}).get("enabled") and _has_batchnorm(model):
            raise ConfigError(f'"{mode}": {{"enabled": true}} casts BatchNorm weights to {mode} next to fp32 running '
                              f'statistics; for BatchNorm backbones use "torch_autocast": {{"enabled": true, "dtype": '
                              f'"bfloat16"}} (see ds_configs/lamb_bf16.json)')


def autocast(engine):
    """The engine's ``torch_autocast`` context, for work that bypasses ``engine.forward`` (attacks,
    evaluation); a no-op when the config does not ask for autocast."""
    import contextlib
    if not engine.torch_autocast_enabled():
        return contextlib.nullcontext()
    return torch.autocast(device_type=engine.device.type, dtype=engine.torch_autocast_dtype())


def initialize(model: torch.nn.Module, cfg: dict, steps_per_epoch: int, epochs: int):
    """``deepspeed.initialize`` with dat-ds's optimizer and schedule; returns the engine."""
    import deepspeed
    cfg = dict(cfg)
    check_precision(cfg, model)
    micro, gas, total = resolve_batch(cfg, dist.world_size())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas, train_batch_size=total)
    optimizer = create_optimizer(cfg.pop("optimizer", {"type": "Lamb"}), model)
    scheduler = create_scheduler(cfg.pop("scheduler", None), optimizer, steps_per_epoch, epochs, total)
    cfg.pop(ema.CONFIG_KEY, None)  # dat-ds's own setting (dat_ds.ema), not DeepSpeed's
    cfg.setdefault("steps_per_print", 10 ** 9)  # dat-ds logs progress itself
    # DeepSpeed's throughput timer starts in a forward pre-hook on engine.module and, from step 2
    # on, synchronizes the device in every forward: every attack step would stall a GPU. dat-ds
    # times its phases itself (dat_ds.timing), so the timer stays off unless a config asks for it.
    cfg.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
    engine.enable_backward_allreduce = False
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    return engine


def exchange_gradients(engine, compressor: Compressor) -> CommStats:
    """Average the local gradients over ranks through ``compressor`` (call after ``engine.backward``):
    in place in one persistent flat buffer that every ``.grad`` views (:mod:`dat_ds.compress.flat`)."""
    from .compress import exchange
    return exchange(engine, compressor)
