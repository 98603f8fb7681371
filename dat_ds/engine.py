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
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from . import dist
from .compress import CommStats, Compressor
from .optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler

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
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object {{...}}, got {type(cfg).__name__}")
    for key in ("zero_optimization", "fp16", "bf16"):
        if not isinstance(cfg.get(key, {}), dict):
            raise ConfigError(f"{where}: {key} must be a JSON object, got {cfg[key]!r}")
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
    clip = cfg.get("gradient_clipping", 0.0)
    if not _is_number(clip) or clip < 0:
        raise ConfigError(f"{where}: gradient_clipping must be a number >= 0, got {clip!r}")
    _check_spec(cfg, "optimizer", OPTIMIZERS, where, {"type": "Lamb"}, ("model",))
    _check_spec(cfg, "scheduler", SCHEDULERS, where, None, ("optimizer", "steps_per_epoch", "epochs",
                                                             "global_batch_size"))


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
    name = spec.get("type", default["type"] if default else "WarmupPiecewise")
    if name not in registry:
        raise ConfigError(f"{where}: unknown {key} {name!r}; choose one of: {', '.join(registry.names())}")
    params = spec.get("params", {})
    takes = inspect.signature(registry.get(name)).parameters
    unknown = sorted(set(params) - set(takes) - set(filled_in))
    if unknown:
        raise ConfigError(f"{where}: {key} {name!r} has no setting {unknown[0]!r}; it takes: "
                          f"{', '.join(p for p in takes if p not in filled_in)}")
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


COMPLETE = "complete.json"  # written last, once every rank's files are on disk


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)``, fsync, rename over ``path``: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save_checkpoint(engine, ckpt_dir: Path, tag: str, client_state: dict, rank_state: Optional[dict] = None,
                    best: bool = False, keep: int = 2, position: Tuple[int, int] = (0, 0)) -> None:
    """Save through DeepSpeed plus one ``rank{r}.pt`` per rank (RNG, attack and compressor state),
    then mark the checkpoint complete and point ``latest`` at it.

    Atomic as a whole: every rank writes and fsyncs its files, then (after a barrier) rank 0
    fsyncs the rest and writes ``complete.json`` (the files and their sizes, ``position`` =
    ``(epoch, batches done)``, the model settings), and only then moves ``latest``. A crash at any
    point leaves the previous complete checkpoint in charge. ``best=True`` also copies it to
    ``best/``. The ``keep`` newest complete checkpoints are kept, and incomplete ones are removed.
    """
    ckpt_dir = Path(ckpt_dir)
    if dist.is_main() and (ckpt_dir / tag).exists():  # a leftover of an interrupted run: start clean
        shutil.rmtree(ckpt_dir / tag)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    _write_atomic(ckpt_dir / tag / f"rank{dist.rank()}.pt",
                  lambda tmp: torch.save({"rng": rng_state(), **(rank_state or {})}, tmp))
    dist.barrier()
    if dist.is_main():
        files = {}
        for f in sorted((ckpt_dir / tag).iterdir()):
            if f.is_file() and not f.name.startswith("."):
                _fsync(f)
                files[f.name] = f.stat().st_size
        marker = {"tag": tag, "position": list(position), "global_step": engine.global_steps,
                  "world_size": dist.world_size(), "meta": client_state.get("meta", {}), "files": files}
        _write_atomic(ckpt_dir / tag / COMPLETE, lambda tmp: tmp.write_text(json.dumps(marker, indent=1)))
        if best:
            _replace_dir(ckpt_dir / tag, ckpt_dir / BEST)
        _write_atomic(ckpt_dir / LATEST, lambda tmp: tmp.write_text(tag))
        _prune(ckpt_dir, tag, keep)
    dist.barrier()


def _prune(ckpt_dir: Path, current: str, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints (``current`` among them); drop incomplete ones."""
    complete = [t for t, _ in complete_checkpoints(ckpt_dir)]
    for path in ckpt_dir.iterdir():
        if not path.is_dir() or path.name in (current, BEST) or path.name.startswith("."):
            continue
        if path.name not in complete or complete.index(path.name) >= keep:
            shutil.rmtree(path, ignore_errors=True)


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


def complete_checkpoints(ckpt_dir: Path) -> list:
    """``[(tag, marker)]`` of the checkpoints marked complete, newest (furthest position) first."""
    found = []
    for marker in Path(ckpt_dir).glob(f"*/{COMPLETE}"):
        if marker.parent.name == BEST or marker.parent.name.startswith("."):
            continue
        try:
            info = json.loads(marker.read_text())
            found.append((marker.parent.name, info, (tuple(info["position"]), info["global_step"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable marker: treated as incomplete
    return [(tag, info) for tag, info, _ in sorted(found, key=lambda f: f[2], reverse=True)]


def verify_checkpoint(tag_dir: Path, marker: dict) -> Optional[str]:
    """Why the checkpoint in ``tag_dir`` is unusable (missing, truncated or corrupt files), or None."""
    for name, size in marker.get("files", {}).items():
        path = Path(tag_dir) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written (truncated?)"
        if name.endswith(".pt"):
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError) as err:
                return f"{path} is not a torch checkpoint archive ({err})"
            if bad is not None:
                return f"{path} is corrupt (checksum of {bad} does not match)"
    return None


def pick_checkpoint(ckpt_dir: Path, meta: dict, world_size: int, warn=None) -> Optional[Tuple[str, dict]]:
    """The newest complete, intact checkpoint in ``ckpt_dir`` as ``(tag, marker)``; None when there
    is none at all.

    Incomplete checkpoints (no marker: the save was interrupted) and damaged ones are skipped,
    each with a line to ``warn``; one written for another model or world size is refused.
    """
    ckpt_dir = Path(ckpt_dir)
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    complete = complete_checkpoints(ckpt_dir)
    names = {t for t, _ in complete}
    if not complete and latest_tag(ckpt_dir) is not None:  # written before completeness markers
        return latest_tag(ckpt_dir), {}
    for path in sorted(ckpt_dir.glob("*/")) if ckpt_dir.is_dir() else []:
        if path.is_dir() and path.name not in names and path.name != BEST and not path.name.startswith("."):
            warn(f"--resume: ignoring incomplete checkpoint {path} (its save did not finish)")
    problems = []
    for tag, marker in complete:
        _check_same_model(ckpt_dir / tag, marker, meta, world_size)
        problem = verify_checkpoint(ckpt_dir / tag, marker)
        if problem is None:
            if problems:
                warn(f"--resume: falling back to the previous complete checkpoint {ckpt_dir / tag}")
            return tag, marker
        warn(f"--resume: checkpoint {ckpt_dir / tag} is damaged: {problem}")
        problems.append(problem)
    if problems:
        raise ConfigError(f"--resume: no intact checkpoint in {ckpt_dir} ({problems[0]}); "
                          f"start afresh with another --output-dir")
    return None


MODEL_KEYS = ("backbone", "stem", "dataset", "num_classes", "in_chans", "img_size", "classes")


def _check_same_model(tag_dir: Path, marker: dict, meta: dict, world_size: int) -> None:
    saved = marker.get("meta", {})
    for key in MODEL_KEYS:
        if key in saved and key in meta and saved[key] != meta[key]:
            raise ConfigError(f"--resume: checkpoint {tag_dir} has {key} {saved[key]!r}, this run {meta[key]!r}; "
                              f"it belongs to another model (use another --output-dir)")
    if marker.get("world_size", world_size) != world_size:
        raise ConfigError(f"--resume: checkpoint {tag_dir} was written by {marker['world_size']} ranks, this run has "
                          f"{world_size}; resume with {marker['world_size']} (per-rank RNG, data position and "
                          f"compressor state)")


def load_error_reason(err: BaseException) -> str:
    """The telling line of a failed ``torch.load``: for a refused pickle, the global it wanted."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand \S+", text)
    if found:
        return f"it would run {found.group(1) if found.groups() else found.group(0)} when unpickled"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_checkpoint(engine, ckpt_dir: Path, tag: Optional[str] = None) -> Optional[Tuple[dict, dict]]:
    """Restore engine, optimizer, schedule and this rank's RNG from ``tag`` (default: ``latest``).

    Returns ``(client_state, rank_state)``, or None when there is no checkpoint. Every file is
    read with ``weights_only=True``: a file that would run code when unpickled is refused.
    """
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    where = Path(ckpt_dir) / tag
    try:
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        rank_file = where / f"rank{dist.rank()}.pt"
        rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else {}
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"checkpoint {where} refused: not a plain tensor checkpoint or damaged "
                          f"({load_error_reason(err)})") from None
    if client_state is None:
        raise ConfigError(f"checkpoint {where} could not be loaded")
    if "rng" in rank_state:
        set_rng_state(rank_state["rng"])
    return client_state, rank_state


def restore_best(engine, ckpt_dir: Path) -> None:
    """Load the weights of ``best/`` (the best held-out epoch) into the engine."""
    engine.load_checkpoint(str(ckpt_dir), tag=BEST, load_optimizer_states=False, load_lr_scheduler_states=False)
