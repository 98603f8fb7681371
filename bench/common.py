"""Shared bits of the benchmarks: machine description, timing, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import List

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each fn, interleaved (A B C A B C ...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(headers: List[str], rows: List[list]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float)
                                            else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fill_disk(directory: Path) -> Path:
    """Fill the file system under ``directory`` to its last block (a full disk for the fault
    checks); returns the filler file, whose removal frees it again."""
    filler = Path(directory) / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
