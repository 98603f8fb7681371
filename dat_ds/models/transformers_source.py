"""transformers backbones: ``--backbone transformers:NAME_OR_PATH``.

``NAME_OR_PATH`` is a local ``save_pretrained`` folder (offline) or a hub model id (online) of
any ``AutoModelForImageClassification`` model. The wrapper keeps dat-ds's contract: pixels in
[0, 1] (the image processor's mean/std inside the model), a tensor in and a logits tensor out,
the head resized to the dataset's classes, the images fed with the channels the model's config
declares (``num_channels``: grey data repeated to RGB for a 3-channel model, fed as is to a grey
one; anything else refused when the model is built), and the position embeddings interpolated when
a ViT-like model runs at another resolution than its config's.

The model's config (without label names) is kept in the checkpoint as a byte buffer, so a run
is rebuilt for evaluation or export even after the original folder has moved.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .normalize import NormalizedModel, check_channels, normalization, per_channel
from .sources import SOURCES, BackboneSource, check_stem
from .timm_source import class_names as recorded_class_names

CONFIG_BUFFER = "hf_config_json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNSTORED = ("_name_or_path", "id2label", "label2id", "transformers_version", "dtype", "torch_dtype")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HFClassifier(nn.Module):
    """A transformers image classifier as ``pixel_values -> logits`` on tensors."""

    def __init__(self, model: nn.Module, config_json: str, interpolate: bool):
        super().__init__()
        self.model, self.interpolate = model, interpolate
        raw = torch.frombuffer(bytearray(config_json.encode()), dtype=torch.uint8).clone()
        self.register_buffer(CONFIG_BUFFER, raw)  # a tensor, so every checkpoint path carries it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            return self.model(pixel_values=x, interpolate_pos_encoding=True).logits
        return self.model(pixel_values=x).logits

    def get_classifier(self) -> nn.Linear:
        """The head: the last linear layer with one output per class."""
        n = self.model.config.num_labels
        heads = [m for m in self.model.modules() if isinstance(m, nn.Linear) and m.out_features == n]
        if not heads:
            raise ValueError(f"{type(self.model).__name__} has no linear head with {n} outputs")
        return heads[-1]


@contextlib.contextmanager
def _quiet():
    """transformers' load reports and progress bars off (the head is re-initialised on purpose)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _local(name: str) -> Optional[Path]:
    """The folder ``name`` points to; ``None`` for a hub id; ``ValueError`` for a missing path."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"transformers backbone {name!r}: {path} has no config.json "
                             f"(expected a save_pretrained folder)")
        return path
    if name.startswith(("/", ".", "~")) or not HUB_ID.match(name):
        raise ValueError(f"transformers backbone {name!r}: no such folder (and not a hub model id)")
    return None


def load_config(name: str):
    """The model config of a folder or hub id, checked to be an image classifier."""
    from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING, AutoConfig
    where = _local(name)
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(str(where or name))
    except (OSError, ValueError, KeyError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        source = f"folder {where}" if where else "the hub (offline? use a local save_pretrained folder)"
        raise ValueError(f"transformers backbone {name!r}: cannot read its config from {source}: {why}") from None
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise ValueError(f"transformers backbone {name!r}: a {config.model_type!r} model is not an "
                         f"image classifier (no AutoModelForImageClassification class)")
    return config


def processor_stats(name: str, config, fallback: Optional[tuple] = None) -> tuple:
    """``(mean, std)`` with one value per channel the model declares: the image processor's, else
    the model config's, else ImageNet's for a 3-channel model and ``fallback`` (the dataset's) for
    another; ``ValueError`` when the declared statistics do not fit the model's channels."""
    stats = None
    where = _local(name)
    if where is not None:
        file = where / "preprocessor_config.json"
        if file.is_file():
            cfg = json.loads(file.read_text())
            stats = cfg.get("image_mean"), cfg.get("image_std")
    else:
        try:
            from transformers import AutoImageProcessor
            with _quiet():
                proc = AutoImageProcessor.from_pretrained(name)
            stats = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        except (OSError, ValueError, ImportError):
            stats = None
    if not stats or stats[0] is None or stats[1] is None:
        stats = getattr(config, "image_mean", None), getattr(config, "image_std", None)
    chans = model_channels(config)
    if stats[0] is None or stats[1] is None:
        stats = (IMAGENET_MEAN, IMAGENET_STD) if chans == 3 or fallback is None else fallback
    return (tuple(_channels(stats[0], chans, name, "image_mean")),
            tuple(_channels(stats[1], chans, name, "image_std")))


def model_channels(config) -> int:
    """The input channels the model's config declares (``num_channels``; 3 when it says nothing)."""
    return int(getattr(config, "num_channels", 3))


def _channels(value, chans: int, name: str, what: str) -> list:
    """``value`` as one number per channel: a single number (or equal ones, a statistic of no
    particular channel) serves every channel; differing ones must be one per channel."""
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) == chans:
        return values
    if values and len(set(values)) == 1:
        return values[:1] * chans
    raise ValueError(f"transformers backbone {name!r}: its {what} has {len(values)} values {values} for a "
                     f"{chans}-channel model (num_channels={chans}); fix preprocessor_config.json")


def _set_labels(config, num_classes: int, names: Optional[Sequence[str]]) -> None:
    names = [str(n) for n in names] if names and len(names) == num_classes else \
        [f"LABEL_{i}" for i in range(num_classes)]
    config.num_labels = num_classes
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}


def config_json(config) -> str:
    """The config without label names and paths: equal for every run of the same architecture."""
    d = {k: v for k, v in config.to_dict().items() if k not in UNSTORED}
    return json.dumps(d, sort_keys=True)


def _pair(size) -> tuple:
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _wrap(model: nn.Module, name: str, img_size: int, in_chans: int, mean, std) -> NormalizedModel:
    """Normalization, channel and resolution handling around a loaded transformers model."""
    model.float()
    chans = model_channels(model.config)
    check_channels(f"transformers:{name}", chans, in_chans)
    size = getattr(model.config, "image_size", None)
    takes = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    other = size is not None and _pair(size) != (img_size, img_size)
    wrapped = HFClassifier(model, config_json(model.config), interpolate=takes and other)
    if other and not takes:
        _probe(wrapped, name, chans, img_size)
    return NormalizedModel(wrapped, mean, std)


def _probe(model: HFClassifier, name: str, chans: int, img_size: int) -> None:
    """One forward at ``img_size`` px, so a model that cannot run there fails now, in one line."""
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, chans, img_size, img_size))
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"transformers backbone {name!r} does not run at {img_size} px: "
                         f"{str(err).strip().splitlines()[0]}") from None
    finally:
        model.train(was)


@SOURCES.register("transformers")
class TransformersSource(BackboneSource):
    """``AutoModelForImageClassification`` from a local folder or the hub."""
    usage = "transformers:NAME_OR_PATH"

    def check(self, name: str) -> None:
        load_config(name)

    def create(self, name: str, num_classes: int, in_chans: int = 3, img_size: int = 224,
               mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), pretrained: Optional[bool] = None,
               stem: str = "auto", class_names: Optional[Sequence[str]] = None, **kwargs) -> NormalizedModel:
        """The folder's (or hub model's) weights with a new ``num_classes`` head; ``mean``/``std``
        (the dataset's) give way to the image processor's; ``pretrained=False``: random weights."""
        from transformers import AutoModelForImageClassification
        check_stem(stem)
        if stem == "small":
            raise ValueError("--stem small is for timm backbones; a transformers backbone keeps its own stem")
        config = load_config(name)
        check_channels(f"transformers:{name}", model_channels(config), in_chans)  # before any weights load
        stats = processor_stats(name, config, (per_channel(mean, in_chans), per_channel(std, in_chans)))
        _set_labels(config, num_classes, class_names)
        with _quiet():
            if pretrained is False:
                model = AutoModelForImageClassification.from_config(config, **kwargs)
            else:
                where = _local(name)
                model = AutoModelForImageClassification.from_pretrained(
                    str(where or name), config=config, ignore_mismatched_sizes=True, **kwargs)
        return _wrap(model, name, img_size, in_chans, *stats)

    def rebuild(self, name: str, meta: dict, weights: dict) -> NormalizedModel:
        """From the config the checkpoint holds (the folder is not needed), else from ``name``."""
        raw = weights.get(f"backbone.{CONFIG_BUFFER}")
        if raw is None:
            return self.create(name, meta["num_classes"], meta["in_chans"], meta["img_size"], meta["mean"],
                               meta["std"], pretrained=False)
        from transformers import AutoConfig, AutoModelForImageClassification
        d = json.loads(bytes(raw.tolist()).decode())
        config = AutoConfig.for_model(d.pop("model_type"), **d)
        _set_labels(config, meta["num_classes"], meta.get("class_names"))
        with _quiet():
            model = AutoModelForImageClassification.from_config(config)
        chans = model_channels(config)
        return _wrap(model, name, meta["img_size"], meta["in_chans"], (0.5,) * chans, (0.5,) * chans)

    def export(self, name: str, model: NormalizedModel, meta: dict, out: Path) -> str:
        """A ``save_pretrained`` folder (safetensors, config with the class names) plus an image
        processor config with the normalization and input size."""
        from transformers import ViTImageProcessor
        folder = out / "transformers"
        hf = model.backbone.model
        _set_labels(hf.config, meta["num_classes"], recorded_class_names(meta))
        hf.save_pretrained(str(folder), safe_serialization=True)
        norm, size = normalization(model), meta["img_size"]
        # grey images reach an RGB model repeated to 3 channels, as in training (PIL's convert("RGB"))
        rgb = getattr(hf.config, "num_channels", 3) == 3
        ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=2, do_rescale=True,
                          rescale_factor=1 / 255, do_normalize=True, image_mean=norm["mean"],
                          image_std=norm["std"], do_convert_rgb=rgb).save_pretrained(str(folder))
        call = ", interpolate_pos_encoding=True" if model.backbone.interpolate else ""
        return (f"transformers/: save_pretrained folder + preprocessor_config.json "
                f"(AutoModelForImageClassification.from_pretrained(...)(pixel_values=...{call}))")
