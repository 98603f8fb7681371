"""Command-line plumbing shared by the recipes: flags in, a plain ``TrainConfig`` out.

The library never sees ``argparse``; a recipe calls :func:`parser` with its own defaults,
then :func:`train_config` and :func:`run`. The flags of the components (attack, objective,
compressor, dataset) are derived from the settings each registered component declares in its
signature (``Registry.settings``): a flag the chosen component does not take is an error that
names the flag and the component. ``--plugin MODULE`` imports a module (a dotted name or a
``.py`` file) that registers more components before the flags are built. Bad input ends the
process with one line on stderr and exit code 2 (a misspelt flag: a short usage line and the
closest flag), printed once per job under a launcher (:mod:`dat_ds.job_lines`).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .suggest import did_you_mean

PLUGINS_ENV = "DAT_DS_PLUGINS"  # comma-separated modules, loaded like --plugin

# torch warns on import of its extension builder (which DeepSpeed imports) that a CPU machine has no
# CUDA runtime: noise on every rank before a recipe has said anything
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def number(text: str) -> float:
    """A float that may be written as a fraction, e.g. ``8/255``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def rank_list(text: str) -> tuple:
    """``"1,3"`` -> ``(1, 3)``."""
    try:
        return tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ranks: {text!r}") from None


# --- plugins ----------------------------------------------------------------------------------

def load_plugins(argv: Optional[List[str]] = None) -> List[str]:
    """Import the modules named by ``--plugin`` in ``argv`` (and ``$DAT_DS_PLUGINS``); they
    register attacks, objectives, compressors, datasets or backbone sources. Returns their names."""
    argv = sys.argv[1:] if argv is None else argv
    names = [n for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            names.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            names.append(arg.split("=", 1)[1])
    for name in names:
        _import_plugin(name.strip())
    return names


def _import_plugin(name: str) -> None:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--plugin {name}: no such file")
        module_name = f"dat_ds_plugin_{path.stem}"
        if module_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ValueError(f"--plugin {name}: cannot import it ({err})") from None


# --- component settings -----------------------------------------------------------------------

@dataclass
class Component:
    """One kind of registered component chosen by a flag (``--attack``) with settings of its own."""
    kind: str  # "attack", "loss", "compressor", "dataset"
    flag: str  # the TrainConfig field naming the choice
    target: str  # the TrainConfig field taking its settings
    settings: Callable[[str], dict]  # name -> {setting: default}
    all_names: Callable[[], List[str]]
    setting_docs: Callable[[str], dict] = lambda name: {}  # name -> {setting: help text}


def components() -> List[Component]:
    from . import attacks, compress, objectives
    from .trainer.config import dataset_settings
    from . import data
    dataset_names = getattr(data, "dataset_names", lambda: list(data.DATASETS))
    return [Component("attack", "attack", "attack_kwargs", attacks.ATTACKS.settings, attacks.names,
                      attacks.ATTACKS.setting_docs),
            Component("loss", "loss", "loss_kwargs", objectives.OBJECTIVES.settings, objectives.names,
                      objectives.OBJECTIVES.setting_docs),
            Component("compressor", "compressor", "compressor_kwargs", compress.COMPRESSORS.settings, compress.names,
                      compress.COMPRESSORS.setting_docs),
            Component("dataset", "dataset", "dataset_kwargs", dataset_settings, dataset_names)]


# Settings that have a flag of another name, and settings a recipe flag sets outside the component.
FLAG_NAMES = {("compressor", "momentum"): "sign_momentum"}
NOT_FLAGS = {("attack", "eps")}  # --eps is a run setting (the evaluation uses it too)

# Help and parsing of the settings the built-in components declare; others get a generic flag.
SETTING_HELP = {
    "alpha": dict(type=number, help="attack step size (default: the attack's own rule)"),
    "steps": dict(type=int, help="attack steps (PGD-k: 10), or the replays m of free (4)"),
    "tau": dict(type=int, help="conadv: staleness of the attack's weights, in updates (1)"),
    "bn_mode": dict(choices=("eval", "train"), help="BatchNorm mode during the attack (eval)"),
    "random_start": dict(action=argparse.BooleanOptionalAction, help="PGD: start from a random point in the ball"),
    "lam": dict(type=float, help="mix: weight of the robust loss (1)"),
    "label_smoothing": dict(type=float, metavar="S", help="madry, mix: label smoothing of the training targets "
                                                          "(0; check a smoothed model with AutoAttack)"),
    "beta": dict(type=float, help="trades: weight of the KL term (6)"),
    "sigma": dict(type=number, help="smoothing: std of the Gaussian noise, in [0,1] pixels (0.25)"),
    "noise_copies": dict(type=int, metavar="M", help="smoothing: noise draws per sample (per-rank batch = M x micro)"),
    "bits": dict(type=int, help="qsgd: bits per coordinate (1..8, or 16; default 8)"),
    "bucket_size": dict(type=int, help="values per norm/scale bucket (qsgd 512, ef_sign 2048)"),
    "topology": dict(help="one-sided: all-gather of compressed gradients; two-sided: parameter server "
                          "(every rank serves a 1/N shard and re-compresses the aggregate)"),
    "sign_momentum": dict(type=float, help="sign_vote: momentum (Signum); 0 = signSGD"),
    "byzantine_ranks": dict(type=rank_list, metavar="R1,R2", help="experiments: ranks that send corrupted gradients"),
    "byzantine_mode": dict(help="flip (-g), random (noise of |g|), scale (-100 g)"),
    "hf_split": dict(metavar="TRAIN,TEST", help="hf: split names (default: train and the first of test/validation)"),
    "image_column": dict(help="hf: the image column (default: the Image feature)"),
    "label_column": dict(help="hf: the label column (default: the ClassLabel, else label/labels)"),
    "cache_dir": dict(help="hf: cache folder (default: HF_DATASETS_CACHE; never inside --data-dir)"),
    "mean": dict(metavar="M1,M2,M3", help="hf: normalization mean (default: measured on a sample)"),
    "std": dict(metavar="S1,S2,S3", help="hf: normalization std (default: measured on a sample)"),
    "stats_samples": dict(type=int, help="hf: images that measure mean/std (1000)"),
    "decoder": dict(help="imagefolder: how JPEGs are decoded, the crop drawn from the header first: simplejpeg: "
                         "libjpeg-turbo at the DCT scale the crop needs (default); pil-draft: the same scaling in "
                         "Pillow; pil: Pillow in full, torchvision's transforms byte for byte"),
}


def _flag(kind: str, setting: str) -> str:
    return FLAG_NAMES.get((kind, setting), setting)


def _generic(default) -> dict:
    """Parsing for a setting no table entry describes, from its default value."""
    if isinstance(default, bool):
        return dict(action=argparse.BooleanOptionalAction)
    if isinstance(default, int):
        return dict(type=int)
    if isinstance(default, float):
        return dict(type=number)
    return dict(type=str)


def _setting_table() -> Dict[str, dict]:
    """``{flag dest: {"takers": {(kind, name): setting}, "default": first default seen}}``."""
    table: Dict[str, dict] = {}
    for comp in components():
        for name in comp.all_names():
            for setting, default in comp.settings(name).items():
                if (comp.kind, setting) in NOT_FLAGS:
                    continue
                entry = table.setdefault(_flag(comp.kind, setting), {"takers": {}, "default": default})
                entry["takers"][(comp.kind, name)] = setting
                entry.setdefault("doc", comp.setting_docs(name).get(setting))
    return table


def _add_setting_flags(p: argparse.ArgumentParser, table: Dict[str, dict]) -> None:
    groups = {kind: p.add_argument_group(f"{kind} settings (only the chosen {kind}'s; the default is its own)")
              for kind in ("attack", "loss", "compressor", "dataset")}
    taken = {dest for a in p._actions for dest in [a.dest]}
    for dest, entry in sorted(table.items()):
        if dest in taken:
            raise ValueError(f"setting {dest!r} of {_takers(entry)} clashes with the flag "
                             f"--{dest.replace('_', '-')}")
        kind = next(iter(entry["takers"]))[0]
        spec = dict(SETTING_HELP.get(dest) or _generic(entry["default"]))
        spec["help"] = (spec.get("help") or entry.get("doc") or "") + f" [{_takers(entry)}]"
        groups[kind].add_argument(f"--{dest.replace('_', '-')}", dest=dest, default=None, **spec)


def _takers(entry: dict) -> str:
    return ", ".join(f"{kind} {name}" for kind, name in entry["takers"])


def choices_help(what: str, registry) -> str:
    """``what``, then every registered name with the first sentence of its docstring (plugins included)."""
    return f"{what}: " + "; ".join(f"{name}: {_first_sentence(registry.get(name))}" for name in registry.names())


def _first_sentence(obj) -> str:
    """The docstring's first sentence, cut at a semicolon and, when long, at a colon after its head."""
    text = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split()).replace("``", "")
    ends = [m.start() for m in re.finditer(r"\.(\s|$)", text) if not re.search(r"\b(al|e\.g|i\.e)$", text[:m.start()])]
    text = text[:ends[0]] if ends else text
    text = text.split("; ")[0]
    if len(text) > 90 and ": " in text[20:]:
        text = text[:20] + text[20:].split(": ")[0]
    return text.rstrip(".:") or "(no description)"


# --- the parser -------------------------------------------------------------------------------

class UsageError(ValueError):
    """A command line the parser refuses; :func:`run` prints ``usage`` (one line) before it."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every flag with a default, unless its help already says what the
    default is (or there is none: None, off, empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is none for none in (None, False, argparse.SUPPRESS)) \
                or action.default == []:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the recipes: defaults in ``--help``; a refused command line raises
    :class:`UsageError` (one usage line, not the whole flag list) and names the closest flag or choice."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        raise UsageError(message, f"usage: {self.prog} [options]  ({self.prog} --help lists them)")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        try:
            ns, rest = self.parse_known_args(args, namespace)
        except UsageError:  # e.g. a required flag missing because it was misspelt: name the typo
            unknown = self._unknown_flags(args)
            if unknown:
                self.error(f"unrecognized argument {unknown[0]}{self._hint(unknown[0])}")
            raise
        if rest:
            unknown = self._unknown_flags(rest)
            self.error(f"unrecognized arguments: {' '.join(rest)}{self._hint(unknown[0]) if unknown else ''}")
        return ns

    def _unknown_flags(self, args) -> List[str]:
        """The ``--names`` in ``args`` that are no flag (nor an abbreviation of one)."""
        names = [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]
        return [n for n in names if not any(option.startswith(n) for option in self._option_string_actions)]

    def _hint(self, name: str) -> str:
        return did_you_mean(name, [o for o in self._option_string_actions if o.startswith("--")], quote=False)

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            hint = did_you_mean(str(value), [str(c) for c in action.choices]) if action.choices else ""
            raise argparse.ArgumentError(action, f"{err.message}{hint}") from None


class RecipeParser(ArgumentParser):
    """Records which flags the user gave (``args._given``), so that a setting given to a
    component that does not take it is an error, and a recipe's default is passed only where it
    applies."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        ns, rest = super().parse_known_args(args, namespace)
        ns._given = self._given_dests(args)
        return ns, rest

    def _given_dests(self, args) -> set:
        saved = [(a, a.default) for a in self._actions]
        saved_defaults = dict(self._defaults)
        try:
            for a in self._actions:
                a.default = argparse.SUPPRESS
            self._defaults.clear()
            ns, _ = argparse.ArgumentParser.parse_known_args(self, args, None)
        finally:
            for a, d in saved:
                a.default = d
            self._defaults.update(saved_defaults)
        return set(vars(ns))


def parser(description: str, **defaults) -> argparse.ArgumentParser:
    """The contract every recipe keeps; ``defaults`` set the recipe's own starting values."""
    import deepspeed

    from . import attacks, compress, objectives
    load_plugins()
    from . import data
    dataset_names = list(getattr(data, "dataset_names", lambda: list(data.DATASETS))())
    p = RecipeParser(description=description)
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (dotted name or .py file) first: it may register attacks, losses, "
                        f"compressors, datasets or backbone sources (also ${PLUGINS_ENV})")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion_mnist", help="the dataset: " + " | ".join(dataset_names))
    g.add_argument("--data-dir", default=None,
                   help="folder holding the dataset files (default: the dataset's own place, e.g. Debian's "
                        "Fashion-MNIST package; CIFAR and imagefolder need it); with --data-placement local it "
                        "may name {rank}, {local_rank} and {node_rank}")
    g.add_argument("--data-placement", choices=("global", "local"), default="global",
                   help="global: every rank reads its share of one dataset; local: each rank reads only the "
                        "folder it holds (--data-dir, or the hf: path, as that node sees it), ranks naming the "
                        "same folder split it, every rank trains the smallest shard's steps per epoch and the "
                        "test figures count the union of the folders' test sets (default: global)")
    g.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="use only N training samples (default: all)")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N", help="use only N test samples (default: all)")
    g.add_argument("--classes", default=None, metavar="IDS",
                   help="train and test on these classes only, e.g. 0-4 or 5,6,7,8,9 (labels become 0..k-1 in "
                        "the listed order; the checkpoint records the original ids; default: all classes)")
    g.add_argument("--img-size", type=int, default=None,
                   help="input resolution of imagefolder and hf: datasets (default: 224 for imagefolder; for hf: "
                        "the images' own size when they share one square size, else 224); datasets of one fixed "
                        "size refuse another")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per rank")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="resnet18",
                   help="NAME or timm:NAME (any timm model), or transformers:NAME_OR_PATH (a save_pretrained "
                        "folder or a hub id)")
    g.add_argument("--stem", default="auto", choices=("auto", "small", "native"),
                   help="small: 3x3 stride-1 stem for small images (auto: inputs <= 64 px); native: timm's stem")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from the backbone's published weights (timm: the hub or a local-dir: name; "
                        "transformers: the folder's or hub model's weights) or from random ones; default: "
                        "timm random, transformers pretrained")
    g.add_argument("--sync-bn", action="store_true",
                   help="torch's SyncBatchNorm: BatchNorm batch statistics over every rank in each forward "
                        "(GPUs; for small per-rank batches). Without it, each rank's running statistics are "
                        "pooled before every evaluation and checkpoint, so all ranks hold one model")
    g = p.add_argument_group("speed (dat_ds.speed)")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="weights, batches, perturbations and input gradients in the channels-last memory format "
                        "(auto: on for convolutional backbones on a GPU, off on the CPU and for transformers)")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the backbone once for training, attacks and evaluation (auto: on on a GPU; "
                        "a backbone that fails to compile runs eager, with one line saying so)")
    g = p.add_argument_group("training method")
    g.add_argument("--attack", default="pgd", choices=attacks.names(),
                   help=choices_help("training oracle (inner maximization)", attacks.ATTACKS))
    g.add_argument("--eps", type=number, default=0.1,
                   help="radius in [0,1] pixels (Linf, or L2 for pgd_l2), e.g. 8/255")
    g.add_argument("--loss", default="madry", choices=objectives.names(),
                   help=choices_help("training objective (outer minimization)", objectives.OBJECTIVES))
    g.add_argument("--views", type=int, default=1, metavar="M",
                   help="adversarial views of each image per rank: each image M times in its minibatch, each copy "
                        "from its own random start (batch augmentation; per-rank batch M x micro, M x the compute "
                        "per update; 1: none)")
    g.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the robust-accuracy check")
    g = p.add_argument_group("held-out check (FGSM safety)")
    g.add_argument("--holdout", type=int, default=None,
                   help="training samples held out for a per-epoch PGD/FGSM check (default: for fgsm_rs "
                        "min(1000, 10%% of the training set), else 0); "
                        "the best epoch is kept in checkpoints/best and reported")
    g.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=True,
                   help="stop the run when the held-out check detects catastrophic overfitting "
                        "(--no-early-stop keeps training)")
    g.add_argument("--co-drop", type=float, default=0.2,
                   help="held-out PGD accuracy drop (from its best) that flags catastrophic overfitting")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5,
                   help="passes over the training set (Free-m: epochs of updates); the LR schedule spans them")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights, the data order and subsets, and the attacks' random starts")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this invocation after N epochs (the schedule still spans --epochs); --resume continues")
    g.add_argument("--eval-batch-size", type=int, default=256,
                   help="samples per batch of the per-epoch clean and PGD evaluation")
    g = p.add_argument_group("gradient communication")
    g.add_argument("--compressor", default="none", choices=compress.names(),
                   help=choices_help("how gradients cross ranks", compress.COMPRESSORS))
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="runs/dat",
                   help="folder of the run: checkpoints/, metrics.jsonl, summary.json, config.json")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --output-dir (mid-epoch ones included)")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only)")
    g.add_argument("--max-nonfinite", type=int, default=10, metavar="N",
                   help="stop after N optimizer steps in a row were skipped for a non-finite loss or gradient "
                        "(0: never stop)")
    g.add_argument("--defer-guard", choices=("auto", "on", "off"), default="auto",
                   help="where the per-step non-finite/stop agreement is acted on: on the device, read by the "
                        "host one step later (on; no host read per step, what keeps a GPU's queue full), on the "
                        "host at once (off), or on when the device is a GPU and the step allows it (auto; needs "
                        "dat-ds's Lamb, a compressor without state and an attack other than Free-m)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", default="dat-ds", help="W&B project of the run")
    g = p.add_argument_group("faults")
    g.add_argument("--comm-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a rank with no step progress, or waiting in one collective, this long ends the run "
                        "(exit 4) naming the rank that stopped answering; --resume continues")
    g.add_argument("--save-retries", type=int, default=0, metavar="N",
                   help="failed checkpoint/log writes in a row (disk full, read-only) the run survives; "
                        "one more ends it (exit 5)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(p)
    p._option_string_actions["--deepspeed_config"].help = (
        "the ds_config JSON: batch size, precision, optimizer, LR schedule, EMA (a key neither DeepSpeed nor "
        "dat-ds reads is an error)")
    _add_setting_flags(p, _setting_table())
    p.set_defaults(deepspeed_config="ds_configs/lamb_fp32.json")
    p.set_defaults(**defaults)
    return p


def train_config(args: argparse.Namespace):
    """The ``TrainConfig`` of parsed flags; component settings go to the chosen components.

    A setting flag the user gave that none of the chosen components takes raises ``ValueError``
    naming the flag and the component; a recipe's default for a setting goes only to the
    components that take it.
    """
    from .trainer import TrainConfig
    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    given = getattr(args, "_given", set(vars(args)))
    chosen = {comp.kind: (comp, getattr(cfg, comp.flag)) for comp in components()}
    for dest, entry in _setting_table().items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        routed = False
        for (kind, name), setting in entry["takers"].items():
            comp, chosen_name = chosen[kind]
            if _same_component(kind, name, chosen_name):
                getattr(cfg, comp.target).setdefault(setting, value)
                routed = True
        if not routed and dest in given:
            raise ValueError(f"--{dest.replace('_', '-')} is not a setting of {_chosen_text(chosen, entry)}; "
                             f"it belongs to {_takers(entry)}")
    _check_img_size(cfg, given)
    return cfg


def _check_img_size(cfg, given: set) -> None:
    """``--img-size`` given for a dataset of one fixed image size (its loader declares ``resizes =
    False``) would be ignored: refuse it instead."""
    from .data import DATASETS
    if "img_size" in given and cfg.img_size is not None and cfg.dataset in DATASETS \
            and getattr(DATASETS.get(cfg.dataset), "resizes", True) is False:
        raise ValueError(f"--img-size {cfg.img_size}: dataset {cfg.dataset!r} has one fixed image size and is not "
                         f"resized (imagefolder and hf: datasets take --img-size)")


def _same_component(kind: str, registered: str, chosen: str) -> bool:
    # a family of datasets (hf:NAME) is listed as its prefix and a placeholder (hf:NAME_OR_PATH)
    prefix, colon, _ = registered.partition(":")
    return registered == chosen or (kind == "dataset" and bool(colon) and chosen.startswith(prefix + colon))


def _chosen_text(chosen: dict, entry: dict) -> str:
    kinds = dict.fromkeys(kind for kind, _ in entry["takers"])
    return " or ".join(f"{kind} {chosen[kind][1]!r}" for kind in kinds)


def run(fn: Callable[[], Optional[dict]]) -> None:
    """Run a recipe's main; expected failures become one line on stderr and exit code 2 (3: non-finite
    steps; 128 + N: stopped by signal N), printed once per job under a launcher (:mod:`dat_ds.job_lines`)."""
    from .data import DataError
    from .engine import ConfigError
    from .guard import NonFiniteError, StopRequested
    from .job_lines import print_once
    prog = os.path.basename(sys.argv[0])
    try:
        fn()
    except UsageError as err:
        print_once(f"{prog}: error: ", _one_line(err), before=err.usage)
        sys.exit(2)
    except (ValueError, DataError, ConfigError, FileNotFoundError) as err:
        print_once(f"{prog}: error: ", _one_line(err))
        sys.exit(2)
    except NonFiniteError as err:
        print_once(f"{prog}: error: ", _one_line(err))
        sys.exit(3)
    except StopRequested as err:
        print_once(f"{prog}: ", str(err))
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:  # a second Ctrl-C: no waiting for the other ranks' word
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{prog}: interrupted; the newest complete checkpoint is kept (--resume continues)",
                  file=sys.stderr, flush=True)
        sys.exit(130)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
def print_summary(summary: dict) -> None:
    """The end-of-run table: clean accuracy (TA) and PGD robust accuracy (RA)."""
    if "clean_acc" not in summary:  # the run stopped early on request (--stop-after)
        return
    rows = [("backbone", summary["backbone"]), ("attack (train)", summary["attack"]),
            ("eps", f"{summary['eps']:.4g}"), ("ranks x micro batch", f"{summary['world_size']} x "
            f"{summary['micro_batch_size']} = {summary['global_batch_size']}"),
            ("epochs", summary["epochs"]), ("test samples", summary["eval_samples"]),
            ("TA  clean accuracy", f"{100 * summary['clean_acc']:.2f} %"),
            (f"RA  {summary['eval_attack']} accuracy", f"{100 * summary['robust_acc']:.2f} %"),
            ("compute / comm", f"{summary['compute_s']:.1f} s / {summary['comm_s']:.2f} s")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 24))
    print(f"full robustness suite (PGD sweeps, AutoAttack): python recipes/evaluate.py --checkpoint "
          f"{summary['output_dir']}", flush=True)
