"""``TrainConfig``: what a DAT run needs, and how it builds its components.

Run-level settings are fields; each component (attack, objective, compressor, dataset) is a
registered name plus the settings the user gave it (``*_kwargs``), checked against the
settings that component declares: a setting it does not take is an error, never dropped.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import attacks, compress, objectives, speed
from ..evaluate import PGDSpec
from ..models import check_backbone


def dataset_settings(name: str) -> dict:
    """The settings dataset ``name`` declares (``{}`` where the data module declares none)."""
    from .. import data
    registry = getattr(data, "DATASETS", ())
    if hasattr(data, "dataset_settings"):
        return data.dataset_settings(name)
    return registry.settings(name) if hasattr(registry, "settings") else {}


def check_dataset(name: str, settings: dict) -> None:
    """``ValueError`` for an unknown dataset or a setting it does not take."""
    from .. import data
    if hasattr(data, "check_dataset"):
        return data.check_dataset(name, settings)
    names = list(getattr(data, "dataset_names", lambda: data.DATASETS)())
    if name not in names and not any(n.endswith(":") and name.startswith(n) for n in names):
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(names)}")
    takes = dataset_settings(name)
    unknown = [k for k in settings if k not in takes]
    if unknown:
        raise ValueError(f"dataset {name!r} has no setting {unknown[0]!r}; it takes: {', '.join(takes) or 'none'}")


@contextlib.contextmanager
def _flag_names(settings: dict):
    """Turn a component's ``"steps must be >= 1"`` into ``"--steps must be >= 1"``: a CLI user
    reads the flag they gave."""
    try:
        yield
    except ValueError as err:
        text = str(err)
        name = text.split(" ", 1)[0]
        if name in settings and text.startswith(f"{name} must"):
            raise ValueError(f"--{name.replace('_', '-')}{text[len(name):]}") from None
        raise


@dataclass
class TrainConfig:
    """Everything a DAT run needs; recipes fill it from their command line (:mod:`dat_ds.cli`)."""
    # data
    dataset: str = "fashion_mnist"
    data_dir: Optional[str] = None
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    img_size: Optional[int] = None
    classes: Optional[str] = None  # e.g. "0-4" or "5,6,7": only these classes, relabelled 0..k-1
    num_workers: int = 0
    dataset_kwargs: dict = field(default_factory=dict)  # the dataset's own settings (e.g. an hf: split)
    data_placement: str = "global"  # global: one dataset, sharded; local: each rank reads its own folder
    # model
    backbone: str = "resnet18"
    stem: str = "auto"
    pretrained: Optional[bool] = None  # None: the backbone source's default (timm random, transformers pretrained)
    channels_last: str = "auto"  # weights and batches channels-last (dat_ds.speed); auto: conv backbones on a GPU
    compile: str = "auto"  # torch.compile of the backbone (dat_ds.speed); auto: on a GPU
    sync_bn: bool = False  # torch's SyncBatchNorm (GPUs): batch statistics over every rank in each forward
    # training method: attack (inner maximization) and objective (outer loss)
    attack: str = "pgd"
    eps: float = 0.1
    attack_kwargs: dict = field(default_factory=dict)  # e.g. {"steps": 3, "alpha": 0.02}
    loss: str = "madry"
    loss_kwargs: dict = field(default_factory=dict)  # e.g. {"beta": 6.0}
    views: int = 1  # adversarial views of each image per rank (batch augmentation): per-rank batch views x micro
    # robust-accuracy check and FGSM safety
    eval_steps: int = 10
    eval_batch_size: int = 256
    holdout: Optional[int] = None  # None: for single-step attacks min(1000, 10% of the training set), else 0
    early_stop: bool = True
    co_drop: float = 0.2
    # gradient exchange
    compressor: str = "none"
    compressor_kwargs: dict = field(default_factory=dict)  # e.g. {"bits": 4, "topology": "two-sided"}
    # run
    deepspeed_config: str = "ds_configs/lamb_fp32.json"
    output_dir: str = "runs/dat"
    epochs: int = 5
    stop_after: Optional[int] = None  # end this invocation after N epochs; --resume continues
    seed: int = 0
    resume: bool = False
    save_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: at epoch ends only
    max_nonfinite: int = 10  # consecutive skipped (non-finite) steps that stop the run; 0: never stop
    defer_guard: str = "auto"  # the step guard's agreement on the device (on), on the host (off), auto: on a GPU
    comm_timeout: float = 600.0  # seconds without step progress or inside one collective before a rank gives up
    save_retries: int = 0  # failed checkpoint/log writes in a row the run survives (the next save retries)
    wandb: bool = False
    wandb_project: str = "dat-ds"

    def validate(self) -> None:
        """Check every setting before any work (no DeepSpeed, no data); bad ones raise ValueError."""
        from ..data import check_placement, parse_classes
        for name, low in (("epochs", 1), ("eval_steps", 1), ("holdout", 0), ("eval_batch_size", 1),
                          ("stop_after", 1), ("train_limit", 1), ("eval_limit", 1), ("img_size", 8),
                          ("num_workers", 0), ("seed", 0), ("save_every", 0), ("max_nonfinite", 0),
                          ("save_retries", 0), ("views", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        for kwargs, name, flag in ((self.loss_kwargs, "lam", "lam"), (self.loss_kwargs, "beta", "beta"),
                                   (self.compressor_kwargs, "momentum", "sign_momentum")):
            value = kwargs.get(name, 0.0)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not (isinstance(self.comm_timeout, (int, float)) and 0 < self.comm_timeout < math.inf):
            raise ValueError(f"--comm-timeout must be a number of seconds > 0, got {self.comm_timeout}")
        speed.check_mode("channels-last", self.channels_last)
        speed.check_mode("compile", self.compile)
        from ..guard import DEFER_MODES
        if self.defer_guard not in DEFER_MODES:
            raise ValueError(f"--defer-guard must be one of {', '.join(DEFER_MODES)}, got {self.defer_guard!r}")
        if not 0 < self.co_drop <= 1:
            raise ValueError(f"--co-drop must lie in (0, 1], got {self.co_drop}")
        check_backbone(self.backbone)
        check_dataset(self.dataset, self.dataset_kwargs)
        check_placement(self.data_placement, self.data_dir, self.dataset)
        parse_classes(self.classes)  # syntax; ids are checked against the dataset when it loads
        if Path(self.output_dir).is_file():
            raise ValueError(f"--output-dir {self.output_dir} is a file, not a folder")
        if not math.isfinite(float(self.eps)):
            raise ValueError(f"--eps must be a finite number, got {self.eps}")
        with _flag_names(self.loss_kwargs):
            self.make_objective()
        with _flag_names(self.compressor_kwargs):
            self.make_compressor()  # checks compressor name and settings
        with _flag_names({**self.attack_kwargs, "eps": self.eps}):
            attack = self.make_attack()  # checks attack name, eps, alpha, steps
        self.make_eval_attack()
        # --views M repeats each image M times in its minibatch: only a random start makes the copies
        # M different adversarial examples rather than M identical ones
        if self.views > 1 and not attack.starts_at_random:
            raise ValueError(f"--views {self.views} needs an attack with a random start (each view is one draw "
                             f"of it): {self.attack!r} with these settings starts every view from the same point; "
                             "use --views 1, or pgd/fgsm_rs/conadv with --random-start")

    def validate_world(self, world_size: int) -> None:
        """The settings that depend on the number of ranks."""
        ranks = self.compressor_kwargs.get("byzantine_ranks", ())
        outside = [r for r in ranks if not 0 <= r < world_size]
        if outside:
            raise ValueError(f"--byzantine-ranks: rank {outside[0]} does not exist in a world of {world_size} "
                             f"rank(s) (ranks are 0..{world_size - 1})")

    def make_objective(self) -> objectives.Objective:
        return objectives.create(self.loss, **self.loss_kwargs)

    def make_attack(self) -> attacks.Attack:
        return attacks.create(self.attack, eps=self.eps, loss=self.make_objective().attack_loss, **self.attack_kwargs)

    def make_compressor(self) -> compress.Compressor:
        return compress.create(self.compressor, **self.compressor_kwargs)

    def make_eval_attack(self, steps: Optional[int] = None) -> attacks.Attack:
        """PGD at the training eps, in the training attack's norm: what ``robust_acc`` means in every summary."""
        return attacks.reference_attack(attacks.ATTACKS.get(self.attack).norm, self.eps, steps or self.eval_steps)

    def eval_spec(self, steps: Optional[int] = None):
        """The per-epoch robust-accuracy check as an evaluation column of the suite
        (``recipes/evaluate.py --pgd-steps K`` computes the same column)."""
        attack = self.make_eval_attack(steps)
        return PGDSpec(self.eps, attack.steps, attack.alpha, norm=attacks.ATTACKS.get(self.attack).norm)

    def default_holdout(self, train_size: int) -> int:
        """Held-out samples: as asked, else ``min(1000, 10 %)`` for single-step attacks (catastrophic
        overfitting watch), else none."""
        if self.holdout is not None:
            return self.holdout
        return min(1000, train_size // 10) if attacks.ATTACKS.get(self.attack).single_step else 0
