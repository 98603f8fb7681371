"""Timers, per-epoch metrics (``metrics.jsonl``), ``summary.json`` and W&B, all from rank 0."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict

from . import dist


class Timers:
    """Wall-clock seconds per phase; device work is synchronised so the split is honest."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        dist.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dist.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def move(self, source: str, target: str, seconds: float) -> None:
        """Re-attribute ``seconds`` measured inside ``source`` to ``target``."""
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def reset(self) -> Dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text_atomic(path: Path, text: str) -> None:
    tmp = Path(path).with_suffix(Path(path).suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class RunLogger:
    """Writes ``metrics.jsonl`` (one line per epoch) and ``summary.json``; mirrors both to W&B."""

    def __init__(self, output_dir: Path, config: dict, use_wandb: bool = False, project: str = "dat-ds",
                 resume: bool = False, first_epoch: int = 0):
        self.dir = Path(output_dir)
        self.main = dist.is_main()
        self.run = None
        if not self.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        metrics = self.dir / "metrics.jsonl"
        if not resume:
            metrics.unlink(missing_ok=True)
        elif metrics.is_file():  # drop rows of epochs the resumed run trains again (written before a crash)
            kept = [line for line in metrics.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("epoch", -1) < first_epoch]
            write_text_atomic(metrics, "".join(kept))
        write_json_atomic(self.dir / "config.json", config)
        if use_wandb:
            import wandb
            self.run = wandb.init(project=project, config=config, dir=str(self.dir),
                                  name=self.dir.name, resume="allow" if resume else None)

    def log_epoch(self, row: dict) -> None:
        if not self.main:
            return
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("epoch"))

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
