"""Models that leave the engine: the weights in the backbone source's own format and a
self-contained ``torch.export`` program (``model.pt2``, normalization inside, input in [0, 1]).

    >>> manifest = export_model(model, meta, Path("exported"))          # doctest: +SKIP
    >>> program = torch.export.load("exported/model.pt2").module()      # plain torch, no dat-ds
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .normalize import NormalizedModel, normalization
from .sources import source_of
from .timm_source import class_names

PROGRAM = "model.pt2"
MANIFEST = "export.json"
MAX_BATCH = 4096


def export_program(model: NormalizedModel, in_chans: int, img_size: int, path: Path) -> None:
    """``torch.export`` of the eval-mode model for ``(batch, in_chans, img_size, img_size)`` inputs
    in [0, 1], any batch size; saved to ``path``."""
    example = torch.rand(2, in_chans, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def writable_folder(out) -> Path:
    """``out`` created if needed; a one-line ValueError when it is a file or cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out} is not writable: {err.strerror or err}") from None
    return out


def export_model(model: NormalizedModel, meta: dict, out: Path) -> dict:
    """Write the source's weights folder, ``model.pt2`` and ``export.json`` (what was written,
    input size, normalization, class names) into ``out``; returns the manifest."""
    source, name = source_of(meta["backbone"])
    model = model.eval()
    weights = source.export(name, model, meta, out)
    export_program(model, meta["in_chans"], meta["img_size"], out / PROGRAM)
    manifest = {"backbone": meta["backbone"], "stem": meta.get("stem"), "dataset": meta.get("dataset"),
                "input_size": [meta["in_chans"], meta["img_size"], meta["img_size"]], "input_range": [0.0, 1.0],
                **normalization(model), "class_names": class_names(meta), "weights": weights,
                "program": f"{PROGRAM}: torch.export.load(path).module()(x), x float in [0, 1], "
                           f"normalization inside"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
