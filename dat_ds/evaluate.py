"""Clean and robust accuracy on a rank-sharded test set; counts are summed over ranks.

:func:`evaluate` is the quick check the trainer runs every epoch. :func:`sample_table` is the
full robustness suite (``recipes/evaluate.py``): PGD with restarts, sweeps over eps and steps,
and AutoAttack, recorded per test sample. Attack randomness is seeded from each batch's first
global sample index, and batches are the same blocks of the test set on any number of ranks,
so 1 rank and N ranks give identical results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from . import attacks, dist
from .attacks import Attack
from .data import Placement, ShardSampler, _batch_collate, raw_batches, to_device
from .progress import EvalProgress
from .speed import input_format


def evaluate(model: nn.Module, dataset, spec: Optional["Spec"], device: torch.device, batch_size: int = 256,
             seed: int = 0, num_workers: int = 0, placement: Optional[Placement] = None) -> Dict[str, float]:
    """``clean_acc``, ``eval_samples`` and (with ``spec``) ``robust_acc`` of ``dataset``.

    The per-epoch check of training and the held-out check use the suite's own definition and
    code path (:func:`sample_table`): fp32 whatever the training precision, a sample is robust
    when it is classified correctly clean *and* under the attack, attack randomness seeded per
    batch from ``seed``. ``recipes/evaluate.py`` on the saved model, with the same samples,
    attack, seed and batch size, gives the same figures. Every rank must hold the same model.
    ``placement`` (``--data-placement local``): each rank holds its folder's ``dataset``, and the
    figures count the union of the folders' (see :func:`sample_table`).
    """
    table = sample_table(model, dataset, [spec] if spec is not None else [], device, batch_size, seed, num_workers,
                         placement=placement)
    out = {"clean_acc": table.acc("clean"), "eval_samples": len(table.labels)}
    if spec is not None:
        out["robust_acc"] = table.acc(spec.name)
    return out


# --- the robustness suite: PGD with restarts, sweeps, AutoAttack ----------------------------

NORMS = ("linf", "l2")


def _check_threat(eps: float, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if eps < 0 or (norm == "linf" and eps > 1):
        raise ValueError(f"eps must lie in [0, 1] for linf, got {eps}" if norm == "linf"
                         else f"eps must be >= 0, got {eps}")


AUTOATTACK_SALT = 1 << 30  # PGD restarts use salts 0, 1, ...


def _seed(seed: int, first: int, salt: int) -> int:
    """A torch seed from the run seed, a batch's first global sample index and a salt (the restart)."""
    return int(np.random.SeedSequence([seed, first, salt]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class PGDSpec:
    """PGD-k with random starts; a sample counts as robust only if it survives every restart.

    ``alpha`` defaults to ``2.5 eps / steps`` (the attack's own rule).
    """
    eps: float
    steps: int = 10
    alpha: Optional[float] = None
    restarts: int = 1
    norm: str = "linf"

    def __post_init__(self):
        _check_threat(self.eps, self.norm)
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")
        object.__setattr__(self, "alpha", self.attack().alpha)  # also checks steps and alpha

    @property
    def name(self) -> str:
        return f"pgd{self.steps}x{self.restarts}_{self.norm}_eps{self.eps:.6g}"

    def attack(self) -> attacks.Attack:
        return attacks.create("pgd" if self.norm == "linf" else "pgd_l2", eps=self.eps, alpha=self.alpha,
                              steps=self.steps)

    def record(self, acc: float) -> dict:
        return {"eps": self.eps, "steps": self.steps, "alpha": self.alpha, "restarts": self.restarts,
                "norm": self.norm, "robust_acc": acc}

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor,
                seed: Tuple[int, int]) -> torch.Tensor:
        """``alive`` (clean-correct samples) narrowed to those still correct after every restart."""
        return survivors(self.attack(), self.restarts if self.eps > 0 else 0, model, x, y, alive, seed)


def survivors(attack: Attack, restarts: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              alive: torch.Tensor, seed: Tuple[int, int]) -> torch.Tensor:
    """``alive`` narrowed to the samples ``attack`` fails on in every one of ``restarts`` tries; the
    randomness of try ``i`` is seeded from ``seed`` (run seed, the batch's first index) and ``i``."""
    alive = alive.clone()
    for restart in range(restarts):
        idx = alive.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(_seed(*seed, restart))
            x_adv = attack.perturb(model, x[idx], y[idx])
        with torch.no_grad():
            alive[idx] = model(x_adv).argmax(1) == y[idx]
    return alive


@dataclass(frozen=True, eq=False)
class AttackSpec:
    """Any attack as an evaluation column (e.g. the held-out FGSM check): one try, seeded per batch."""
    attack: Attack
    name: str

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor,
                seed: Tuple[int, int]) -> torch.Tensor:
        return survivors(self.attack, 1, model, x, y, alive, seed)



# AutoAttack's attack sets (pyautoattack's ``_set_version``) and the fewest classes each attack takes:
# the DLR losses divide by the gap between the largest and the 3rd (APGD-DLR) or the mean of the 3rd
# and 4th (targeted, APGD-T) largest logits; a targeted attack needs one other class per target.
AUTOATTACK_VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
                       "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
                       "rand": ("apgd-ce", "apgd-dlr")}
AUTOATTACK_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
AUTOATTACK_TARGETS = 9  # target classes of APGD-T and FAB-T in every version (Linf, L2)


@dataclass(frozen=True)
class AutoAttackSpec:
    """AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package, on the samples that are
    still correctly classified; ``standard`` runs APGD-CE, APGD-T, FAB-T and Square.

    AutoAttack's 9 target classes need 10 classes: with ``C`` classes APGD-T and FAB-T target the
    ``min(9, C - 1)`` most likely other classes, and the attacks on a DLR loss, which needs more
    classes, are left out: APGD-T below 4, APGD-DLR below 3 (``standard`` with 2 or 3 classes:
    APGD-CE, FAB-T on every other class, Square with its margin loss). ``num_classes`` None: the
    width of the model's output; :meth:`record` names the attacks and the target count.
    """
    eps: float
    norm: str = "linf"
    version: str = "standard"
    num_classes: Optional[int] = None
    _seen: List[int] = field(default_factory=list, init=False, compare=False, repr=False)  # what correct() read

    def __post_init__(self):
        _check_threat(self.eps, self.norm)
        if self.version not in AUTOATTACK_VERSIONS:
            raise ValueError(f"AutoAttack version must be one of {', '.join(AUTOATTACK_VERSIONS)}, "
                             f"got {self.version!r}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"AutoAttack needs at least 2 classes, got num_classes={self.num_classes}")

    @property
    def name(self) -> str:
        return f"autoattack_{self.norm}_eps{self.eps:.6g}"

    def plan(self, num_classes: int) -> Tuple[Tuple[str, ...], Optional[int]]:
        """``(attacks, target classes)`` AutoAttack runs against a ``num_classes``-class model
        (target classes None when no targeted attack runs)."""
        run = tuple(a for a in AUTOATTACK_VERSIONS[self.version] if num_classes >= AUTOATTACK_MIN_CLASSES.get(a, 2))
        targeted = any(a in ("apgd-t", "fab-t") for a in run)
        return run, min(AUTOATTACK_TARGETS, num_classes - 1) if targeted else None

    def record(self, acc: float) -> dict:
        classes = self.num_classes if self.num_classes is not None else next(iter(self._seen), None)
        attacks, targets = self.plan(classes) if classes is not None else (None, None)
        return {"eps": self.eps, "version": self.version, "norm": self.norm, "num_classes": classes,
                "attacks": list(attacks) if attacks is not None else None, "target_classes": targets,
                "robust_acc": acc}

    def _classes(self, model: nn.Module, x: torch.Tensor) -> int:
        """The model's class count (the width of its output), checked against ``num_classes``."""
        with torch.no_grad():
            width = model(x[:1]).shape[1]
        if width < 2 or self.num_classes not in (None, width):
            raise ValueError(f"AutoAttack: the model gives {width} logits, "
                             f"{'fewer than 2' if width < 2 else f'but num_classes is {self.num_classes}'}")
        if not self._seen:
            self._seen.append(width)
        return width

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor,
                seed: Tuple[int, int]) -> torch.Tensor:
        from pyautoattack import AutoAttack
        classes = self._classes(model, x)
        if self.eps == 0 or not alive.any():
            return alive.clone()
        idx = alive.nonzero().squeeze(1)
        aa = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[self.norm], eps=self.eps, version=self.version,
                        device=x.device, seed=_seed(*seed, AUTOATTACK_SALT))
        attacks_run, targets = self.plan(classes)
        aa.attacks_to_run = list(attacks_run)   # the version's settings (restarts, queries) stay
        if targets is not None:
            aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = targets
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), attacks.attack_mode(model):
            x_adv, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
        out = alive.clone()
        with torch.no_grad():
            out[idx] = model(x_adv).argmax(1) == y[idx]
        return out


Spec = Union[PGDSpec, AttackSpec, AutoAttackSpec]


class BlockSampler(Sampler[List[int]]):
    """Contiguous blocks of ``batch_size`` indices, dealt to ranks round-robin (a ShardSampler
    over block numbers). A batch holds the same samples whatever the number of ranks, so attacks
    seeded from its first index give the same per-sample results on 1 rank and on N."""

    def __init__(self, length: int, batch_size: int, rank: int, world_size: int):
        self.length, self.batch_size = length, batch_size
        self.blocks = ShardSampler(math.ceil(length / batch_size), rank, world_size)

    def ranges(self) -> List[Tuple[int, int]]:
        return [(b * self.batch_size, min((b + 1) * self.batch_size, self.length)) for b in self.blocks]

    def __iter__(self) -> Iterator[List[int]]:
        return (list(range(start, stop)) for start, stop in self.ranges())

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass
class SampleTable:
    """Per test sample: its label and whether it is classified correctly clean and under each attack."""
    labels: torch.Tensor
    correct: Dict[str, torch.Tensor]

    def acc(self, name: str) -> float:
        return self.correct[name].double().mean().item() if len(self.labels) else 0.0

    def write_csv(self, path) -> None:
        """``index,label,clean,<attack>...`` with 1 = correct, 0 = wrong (robust columns imply clean)."""
        cols = [torch.arange(len(self.labels)), self.labels, *(c.long() for c in self.correct.values())]
        np.savetxt(path, torch.stack(cols, 1).numpy(), fmt="%d", delimiter=",", comments="",
                   header=",".join(["index", "label", *self.correct]))


def _sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.world_size() > 1:
        t = t.to(device)
        tdist.all_reduce(t)
    return t.cpu()


def sample_table(model: nn.Module, dataset, specs: Sequence[Spec], device: torch.device, batch_size: int = 256,
                 seed: int = 0, num_workers: int = 0, progress: Union[bool, EvalProgress] = False,
                 placement: Optional[Placement] = None) -> SampleTable:
    """Clean and robust correctness of every test sample: each rank attacks its blocks of the
    dataset, and the per-sample table is summed over ranks (each row is filled by one rank).
    ``progress``: an :class:`EvalProgress` (True: one on stderr) reports each evaluation per batch.
    ``placement`` (local data): ``dataset`` is this rank's folder's, its blocks are dealt among
    the ranks of that folder, and the table is the union of the folders' (:meth:`Placement.union`)."""
    names = ["clean", *(spec.name for spec in specs)]
    if len(set(names)) < len(names):
        raise ValueError(f"two evaluations share a name: {names}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    # local placement: the folder's blocks dealt among the ranks that hold it
    part, parts = (dist.rank(), dist.world_size()) if placement is None else placement.share()
    sampler = BlockSampler(len(dataset), batch_size, part, parts)
    loader = DataLoader(raw_batches(dataset), batch_sampler=sampler, collate_fn=_batch_collate, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    # label, clean, one column per spec; filled on the device and read once at the end
    table = torch.zeros(len(dataset), 2 + len(specs), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    report = progress if isinstance(progress, EvalProgress) else EvalProgress(enabled=None if progress else False)
    report.begin(len(sampler), math.ceil(len(dataset) / batch_size), [spec.name for spec in specs])
    for batch, ((start, stop), (x, y)) in enumerate(zip(sampler.ranges(), loader)):
        x, y = to_device(x, y, device, input_format(model))  # channels-last for a model laid out so
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        cols = [y, clean]
        for spec in specs:
            with report.step(batch, spec.name):
                cols.append(spec.correct(model, x, y, clean, (seed, start)))
        table[start:stop] = torch.stack([c.long() for c in cols], 1).cpu()
        report.batch_done()
    report.end()
    model.train(was_training)
    table = _sum_over_ranks(table, device) if placement is None else placement.union(table)
    return SampleTable(table[:, 0], {n: table[:, i + 1].bool() for i, n in enumerate(names)})


def plot_sweep(records: Sequence[dict], x: str, path, title: str) -> None:
    """Robust accuracy against ``x`` (``eps`` or ``steps``) as a PNG, e.g. the DAT paper's Figure 3."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, and the caller's backend untouched
    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.plot([r[x] for r in records], [100 * r["robust_acc"] for r in records], marker="o")
    ax.set(xlabel=x, ylabel="robust accuracy (%)", title=title, ylim=(0, 100))
    if x == "steps":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
