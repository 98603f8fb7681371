"""Checkpoints: atomic multi-rank saves, completeness markers, verification and resume.

A checkpoint is DeepSpeed's files plus one ``rank{r}.pt`` per rank; ``complete.json`` is
written last, and ``latest`` moves only after it, so a crash at any moment leaves the previous
complete checkpoint in charge.
"""
from __future__ import annotations

import contextlib
import json
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

from . import dist, faults
from .errors import ConfigError

LATEST = "latest"
BEST = "best"


def _safe_checkpoint_engine(current):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` and keeping the first
    failed write in ``failure`` instead of raising it: DeepSpeed's save has barriers of its own, and
    a rank that raised between them would leave its peers waiting there (see :func:`save_checkpoint`)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(current) is not TorchCheckpointEngine:
        return current

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        failure = None

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

        def save(self, state_dict, path: str):
            if self.failure is None:
                try:
                    _torch_save(state_dict, Path(path), zipfile=self.zipfile_serialization)
                except (OSError, RuntimeError) as err:
                    self.failure = faults.write_failed(path, err)

        def makedirs(self, path, exist_ok=False):
            try:
                os.makedirs(path, exist_ok=exist_ok)
            except OSError as err:
                self.failure = self.failure or faults.write_failed(path, err)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    return safe


def _torch_save(obj, path: Path, zipfile: bool = True) -> None:
    """``torch.save`` through a Python file, so a failed write keeps its errno (ENOSPC, EROFS, ...)
    in the exception chain; a partly written file is removed."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f, _use_new_zipfile_serialization=zipfile)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


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
    """``write(tmp)``, fsync, rename over ``path``: readers see the old file or the whole new one.
    A failed write removes ``tmp`` and raises :class:`~dat_ds.faults.WriteFailed` naming ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise faults.write_failed(path, err) from None


class SaveRetries:
    """Lets a run survive up to ``retries`` failed checkpoint saves in a row: training goes on and
    the next save tries again (the previous complete checkpoint stays in charge meanwhile); one
    more failure ends the run. Every rank takes the same decision (the failure is agreed on)."""

    def __init__(self, retries: int = 0):
        if retries < 0:
            raise ValueError(f"--save-retries must be >= 0, got {retries}")
        self.retries, self.failed = retries, 0

    def __call__(self, save, *args, **kwargs) -> bool:
        """``save(*args, **kwargs)``; True when it succeeded, False when it failed and may be retried."""
        try:
            save(*args, **kwargs)
        except faults.WriteFailed as err:
            self.failed += 1
            if self.failed > self.retries:
                raise
            if dist.is_main():
                print(f"warning: {err}; training goes on and the next save tries again ({self.failed} of "
                      f"{self.retries} failed saves in a row allowed by --save-retries)", file=sys.stderr, flush=True)
            return False
        self.failed = 0
        return True


def save_checkpoint(engine, ckpt_dir: Path, tag: str, client_state: dict, rank_state: Optional[dict] = None,
                    best: bool = False, keep: int = 2, position: Tuple[int, int] = (0, 0)) -> None:
    """Save through DeepSpeed plus one ``rank{r}.pt`` per rank (RNG, attack and compressor state),
    then mark the checkpoint complete and point ``latest`` at it.

    Atomic as a whole: every rank writes and fsyncs its files, then (once all ranks agree that
    they succeeded) rank 0 fsyncs the rest and writes ``complete.json`` (the files and their
    sizes, ``position`` = ``(epoch, batches done)``, the model settings), and only then moves
    ``latest``. A crash at any point leaves the previous complete checkpoint in charge.
    ``best=True`` also copies it to ``best/``. The ``keep`` newest complete checkpoints are kept,
    and incomplete ones are removed.

    A write that fails on any rank (full disk, read-only or unwritable folder) raises the same
    :class:`~dat_ds.faults.WriteFailed` on every rank, after removing the unfinished checkpoint;
    no rank is left waiting for another.
    """
    ckpt_dir = Path(ckpt_dir)
    if dist.is_main() and (ckpt_dir / tag).exists():  # a leftover of an interrupted run: start clean
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    dist.barrier()
    try:
        faults.run_agreed(lambda: _write_rank_files(engine, ckpt_dir, tag, client_state, rank_state))
        faults.run_agreed(lambda: _mark_complete(engine, ckpt_dir, tag, client_state, best, keep, position)
                          if dist.is_main() else None)
    except faults.WriteFailed:  # raised on every rank alike
        if dist.is_main() and not (ckpt_dir / tag / COMPLETE).is_file():
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # frees its space for the next try
        dist.barrier()
        raise


def _write_rank_files(engine, ckpt_dir: Path, tag: str, client_state: dict, rank_state: Optional[dict]) -> None:
    """This rank's share: DeepSpeed's files (rank 0 for ZeRO stage 0) and ``rank{r}.pt``."""
    ckpt_engine = engine.checkpoint_engine
    if hasattr(ckpt_engine, "failure"):
        ckpt_engine.failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as err:
        raise faults.write_failed(ckpt_dir / tag, err) from None
    if getattr(ckpt_engine, "failure", None) is not None:
        raise ckpt_engine.failure
    _write_atomic(ckpt_dir / tag / f"rank{dist.rank()}.pt",
                  lambda tmp: _torch_save({"rng": rng_state(), **(rank_state or {})}, tmp))


def _mark_complete(engine, ckpt_dir: Path, tag: str, client_state: dict, best: bool, keep: int,
                   position: Tuple[int, int]) -> None:
    """Rank 0, once every rank's files are on disk: ``complete.json``, ``best/``, ``latest``, pruning."""
    files = {}
    for f in sorted((ckpt_dir / tag).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            try:
                _fsync(f)
            except OSError as err:
                raise faults.write_failed(f, err) from None
            files[f.name] = f.stat().st_size
    marker = {"tag": tag, "position": list(position), "global_step": engine.global_steps,
              "world_size": dist.world_size(), "meta": client_state.get("meta", {}), "files": files}
    _write_atomic(ckpt_dir / tag / COMPLETE, lambda tmp: tmp.write_text(json.dumps(marker, indent=1)))
    if best:
        try:
            _replace_dir(ckpt_dir / tag, ckpt_dir / BEST)
        except (OSError, shutil.Error) as err:
            shutil.rmtree(ckpt_dir / f".{BEST}.tmp", ignore_errors=True)
            raise faults.write_failed(ckpt_dir / BEST, err) from None
    _write_atomic(ckpt_dir / LATEST, lambda tmp: tmp.write_text(tag))
    _prune(ckpt_dir, tag, keep)


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


def pick_checkpoint(ckpt_dir: Path, meta: dict, world_size: Optional[int] = None, warn=None
                    ) -> Optional[Tuple[str, dict]]:
    """The newest complete, intact checkpoint in ``ckpt_dir`` as ``(tag, marker)``; None when there
    is none at all.

    Incomplete checkpoints (no marker: the save was interrupted) and damaged ones are skipped,
    each with a line to ``warn``; one written for another model is refused. One written by another
    number of ranks is taken (:func:`dat_ds.trainer.state.resume` maps its per-rank state);
    ``world_size`` is accepted for old callers and not used.
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
        _check_same_model(ckpt_dir / tag, marker, meta)
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


def _check_same_model(tag_dir: Path, marker: dict, meta: dict) -> None:
    saved = marker.get("meta", {})
    for key in MODEL_KEYS:
        if key in saved and key in meta and saved[key] != meta[key]:
            raise ConfigError(f"--resume: checkpoint {tag_dir} has {key} {saved[key]!r}, this run {meta[key]!r}; "
                            f"it belongs to another model (use another --output-dir)")


def load_error_reason(err: BaseException) -> str:
    """The telling line of a failed ``torch.load``: for a refused pickle, the global it wanted."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it would run {found.group(1)} when unpickled"
    if re.search(r"Unsupported operand \S+", text):  # its first byte is no pickle opcode
        return "its bytes are not a pickle: not a torch checkpoint"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_checkpoint(engine, ckpt_dir: Path, tag: Optional[str] = None, own_rank: bool = True
                    ) -> Optional[Tuple[dict, dict]]:
    """Restore engine, optimizer, schedule and this rank's RNG from ``tag`` (default: ``latest``).
    ``own_rank=False`` (a checkpoint of another number of ranks) leaves ``rank{r}.pt`` unread.

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
        rank_state = torch.load(rank_file, weights_only=True) if own_rank and rank_file.is_file() else {}
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
