"""Find a training run's checkpoint and rebuild its model for evaluation, without DeepSpeed.

A run's ``--output-dir`` holds ``checkpoints/<tag>/mp_rank_00_model_states.pt`` (written by
DeepSpeed; the client state records the model settings under ``meta``) and
``checkpoints/latest`` naming the newest tag. Any of these paths identifies a checkpoint:

    >>> model, meta = load_model(find_checkpoint("runs/fmnist"))          # doctest: +SKIP
    >>> model, meta = load_model(find_checkpoint("runs/fmnist/checkpoints/best"))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from .engine import LATEST, load_error_reason
from .models import NormalizedModel, rebuild_model

MODEL_FILE = "mp_rank_00_model_states.pt"
CHECKPOINTS = "checkpoints"
KINDS = "a run's --output-dir, its checkpoints/ folder, a checkpoint tag folder or a " + MODEL_FILE + " file"


def find_checkpoint(path, flag: str = "--checkpoint") -> Path:
    """The model-states file behind a run folder, a ``checkpoints/`` folder, a tag folder or the file
    itself; errors name ``flag``, the option the user gave the path with."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} {path} does not exist")
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        if not (path / tag / MODEL_FILE).is_file():
            raise ValueError(f"{path / LATEST} names checkpoint {tag!r}, but {path / tag / MODEL_FILE} is missing")
        return path / tag / MODEL_FILE
    if (path / CHECKPOINTS).is_dir():
        return find_checkpoint(path / CHECKPOINTS, flag)
    raise ValueError(f"no checkpoint in {flag} {path}: expected {KINDS}")


def run_dir(model_file: Path) -> Path:
    """The training run's output folder (parent of ``checkpoints/``), else the file's folder."""
    model_file = Path(model_file).resolve()
    for parent in model_file.parents:
        if parent.name == CHECKPOINTS:
            return parent.parent
    return model_file.parent


def read_states(model_file: Path) -> dict:
    """``torch.load(..., weights_only=True)`` with unreadable files turned into a one-line ValueError."""
    other = _not_torch_file(Path(model_file))
    if other:
        raise ValueError(f"{model_file} is not a checkpoint but {other}; expected {KINDS} (a torch.save archive)")
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {model_file} (refused, corrupt or truncated): "
                         f"{load_error_reason(err)}") from None
    if not isinstance(state, dict) or "module" not in state or "meta" not in state:
        raise ValueError(f"{model_file} is not a dat-ds checkpoint (no 'module' weights or 'meta' settings)")
    return state


def _not_torch_file(path: Path) -> Optional[str]:
    """What ``path`` is when it is neither a torch zip archive nor a pickle (e.g. "a JSON file"), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None  # torch.load names the problem
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a (maybe damaged) zip archive, or a legacy pickle
        return None
    if not head:
        return "an empty file"
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return f"{path.stat().st_size} bytes of other data"
    try:
        json.loads(text)
        return "a JSON file"
    except ValueError:
        return "a text file"


def load_model(model_file: Path, backbone: Optional[str] = None, stem: Optional[str] = None,
               weights: str = "ema") -> Tuple[NormalizedModel, dict]:
    """Rebuild the model from the recorded ``meta`` (``backbone``/``stem`` override it) and load
    the weights strictly; returns ``(model in eval mode, meta)``. A source may rebuild from what
    the weights themselves hold (a transformers config), so a moved model folder does not matter.

    ``weights="ema"`` loads the exponential moving average of the weights when the run kept one
    (``meta["weights"]`` is then ``"ema"``); ``"raw"`` the optimizer's own weights."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"--weights must be ema or raw, got {weights!r}")
    state = read_states(model_file)
    meta = {**state["meta"], **{k: v for k, v in (("backbone", backbone), ("stem", stem)) if v}}
    model = rebuild_model(meta, state["module"])
    try:
        model.load_state_dict(state["module"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {model_file} does not fit backbone {meta['backbone']!r} "
                         f"(stem {meta.get('stem', 'auto')!r}): {_mismatch(model, state['module'], err)}") from None
    average = _ema_state(model_file) if weights == "ema" else None
    if average:
        model.load_state_dict({**model.state_dict(), **average["params"], **average["buffers"]}, strict=True)
        meta["weights"] = "ema"
    return model.eval(), meta


def _ema_state(model_file: Path) -> Optional[dict]:
    """The weights' EMA saved beside ``model_file`` (in rank 0's state), or None."""
    rank_file = Path(model_file).with_name("rank0.pt")
    if not rank_file.is_file():
        return None
    try:
        state = torch.load(rank_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {rank_file} (refused, corrupt or truncated): "
                         f"{load_error_reason(err)}") from None
    return state.get("ema") or None


def _mismatch(model: torch.nn.Module, weights: dict, err: RuntimeError) -> str:
    """One line saying how a state dict and a model disagree."""
    ours = model.state_dict()
    missing, unexpected = set(ours) - set(weights), set(weights) - set(ours)
    shapes = [k for k in set(ours) & set(weights) if ours[k].shape != weights[k].shape]
    if not (missing or unexpected or shapes):
        return str(err).strip().splitlines()[0]
    first = sorted(missing or unexpected or shapes)[0]
    return (f"{len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} mis-shaped "
            f"tensors (first: {first})")
