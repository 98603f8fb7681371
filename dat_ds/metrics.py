"""Timers, per-epoch metrics (``metrics.jsonl``), ``summary.json`` and W&B, all from rank 0."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from pathlib import Path

from . import dist, faults, timing


Timers = timing.Timers  # phase timers live in dat_ds.timing (CUDA events on a GPU)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync, rename over ``path``: readers see the old file or
    the whole new one. A failed write leaves ``path`` as it was and raises
    :class:`~dat_ds.faults.WriteFailed` naming it and the cause."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise faults.write_failed(path, err) from None


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` (a short write, rare on local disks, is an error: the caller undoes it)."""
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")


def append_lines(path: Path, lines: list) -> None:
    """Append whole lines to ``path`` with one write and an fsync. A failed or short write is cut
    back to the old end of the file, so the file never holds a half line; then
    :class:`~dat_ds.faults.WriteFailed` names the path and the cause."""
    data = "".join(line + "\n" for line in lines).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as err:
        raise faults.write_failed(path, err) from None
    try:
        end = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise faults.write_failed(path, err) from None
    finally:
        os.close(fd)


def _rows_before(path: Path, first_epoch: int) -> str:
    """The lines of ``metrics.jsonl`` for epochs before ``first_epoch`` (a line cut short by a crash
    in an older version is dropped too)."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("epoch", -1) < first_epoch:
            kept.append(line if line.endswith("\n") else line + "\n")
    return "".join(kept)


class RunLogger:
    """Writes ``metrics.jsonl`` (one line per epoch) and ``summary.json``; mirrors both to W&B.

    Every write is whole or not at all. A row whose write failed stays pending and goes out with
    the next one (when ``--save-retries`` lets the run go on).
    """

    def __init__(self, output_dir: Path, config: dict, use_wandb: bool = False, project: str = "dat-ds",
                 resume: bool = False, first_epoch: int = 0):
        self.dir = Path(output_dir)
        self.main = dist.is_main()
        self.run = None
        self.pending: list = []
        if not self.main:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise faults.write_failed(self.dir, err) from None
        metrics = self.dir / "metrics.jsonl"
        if not resume:
            try:
                metrics.unlink(missing_ok=True)
            except OSError as err:
                raise faults.write_failed(metrics, err) from None
        elif metrics.is_file():  # drop rows of epochs the resumed run trains again (written before a crash)
            write_text_atomic(metrics, _rows_before(metrics, first_epoch))
        write_json_atomic(self.dir / "config.json", config)
        if use_wandb:
            import wandb
            self.run = wandb.init(project=project, config=config, dir=str(self.dir),
                                  name=self.dir.name, resume="allow" if resume else None)

    def log_epoch(self, row: dict) -> None:
        if not self.main:
            return
        row = {k: _clean(v) for k, v in row.items()}
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("epoch"))
        self.pending.append(json.dumps(row, sort_keys=True))
        append_lines(self.dir / "metrics.jsonl", self.pending)
        self.pending = []

    def finish(self, summary: dict) -> None:
        if not self.main:
            return
        write_json_atomic(self.dir / "summary.json", {k: _clean(v) for k, v in summary.items()})
        if self.run is not None:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.run.finish()


def read_jsonl(path: Path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
