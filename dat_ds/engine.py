"""Glue between dat-ds and the DeepSpeed engine.

The ds_config JSON owns batch size, precision, optimizer, schedule and ZeRO. dat-ds builds the
optimizer and schedule itself (``dat_ds.optim``: LAMB with the paper's layerwise adaptive LR
runs on CPU and GPU, DeepSpeed's FusedLamb is CUDA-only), passes everything else to
``deepspeed.initialize``, and turns DeepSpeed's backward all-reduce off: gradients cross ranks
only through a compressor (``dat_ds.compress``), which is timed and byte-counted.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from . import dist
from .compress import CommStats, Compressor
from .optim import create_optimizer, create_scheduler

LATEST = "latest"
BEST = "best"


class ConfigError(ValueError):
    """A ds_config value is missing, malformed or unsupported; the message names it."""


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
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage != 0:
        raise ConfigError(f"{where}: zero_optimization.stage={stage} is not supported; dat-ds reduces gradients "
                          f"through its own compressors, which needs ZeRO stage 0")
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{where}: fp16 and bf16 are both enabled; pick one")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    if not any(k in cfg for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        raise ConfigError(f"{where}: set train_micro_batch_size_per_gpu (the per-rank batch) or train_batch_size")


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
                              f'"{"bfloat16" if mode == "bf16" else "float16"}"}} (see ds_configs/lamb_bf16.json)')


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
    cfg.setdefault("steps_per_print", 10 ** 9)  # dat-ds logs progress itself
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
    engine.enable_backward_allreduce = False
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    return engine


def exchange_gradients(engine, compressor: Compressor) -> CommStats:
    """Average the local gradients over ranks through ``compressor`` (call after ``engine.backward``)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return compressor.all_reduce_(grads)


# --- checkpoints -----------------------------------------------------------------------------

def _safe_checkpoint_engine(current):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(current) is not TorchCheckpointEngine:
        return current

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    return safe


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, tag: str, client_state: dict, rank_state: Optional[dict] = None,
                    best: bool = False, keep: int = 2) -> None:
    """Save through DeepSpeed plus one ``rank{r}.pt`` per rank (RNG, attack and compressor state),
    then point ``latest`` at it atomically.

    ``latest`` moves only after every rank has written its part, so a crash mid-save leaves the
    previous checkpoint in charge. ``best=True`` also copies it to ``best/``. The ``keep`` newest
    epoch checkpoints are kept.
    """
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save({"rng": rng_state(), **(rank_state or {})}, ckpt_dir / tag / f"rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        if best:
            _replace_dir(ckpt_dir / tag, ckpt_dir / BEST)
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name not in (tag, BEST)
                       and not p.name.startswith(".")), key=lambda p: p.name)
        for old in tags[:max(0, len(tags) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _replace_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def load_checkpoint(engine, ckpt_dir: Path) -> Optional[Tuple[dict, dict]]:
    """Restore engine, optimizer, schedule and this rank's RNG from ``latest``.

    Returns ``(client_state, rank_state)``, or None when there is no checkpoint yet.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client_state is None:
        raise ConfigError(f"checkpoint {Path(ckpt_dir) / tag} could not be loaded")
    rank_file = Path(ckpt_dir) / tag / f"rank{dist.rank()}.pt"
    rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else {}
    if "rng" in rank_state:
        set_rng_state(rank_state["rng"])
    return client_state, rank_state


def restore_best(engine, ckpt_dir: Path) -> None:
    """Load the weights of ``best/`` (the best held-out epoch) into the engine."""
    engine.load_checkpoint(str(ckpt_dir), tag=BEST, load_optimizer_states=False, load_lr_scheduler_states=False)
