"""The DAT training loop (paper Algorithm 1), shared by every recipe.

One step, one direction: data -> attack on ``engine.module`` (input gradients only, no
communication) -> loss -> ``engine.backward`` (local gradients) -> compressor (the only
gradient communication) -> ``engine.step``. Timers around each phase feed the per-epoch
computation/communication split written to ``metrics.jsonl``.

Two oracles change the shape of the step: Free-m replays each minibatch m times and takes its
input gradient from the training backward; ConAdv attacks batch t + 1 with a snapshot of the
weights while update t runs.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

from . import attacks, compress, dist, objectives
from .data import DatasetInfo, eval_loader, load_dataset, start_epoch, train_loader
from .engine import (ConfigError, autocast, exchange_gradients, initialize, load_checkpoint, load_config,
                     pick_checkpoint, resolve_batch, restore_best, save_checkpoint)
from .evaluate import evaluate
from .guard import StepGuard, StopRequested, StopSignal, skip_step
from .metrics import RunLogger, Timers
from .models import check_backbone, create_model


@dataclass
class TrainConfig:
    """Everything a DAT run needs; recipes fill it from their command line."""
    dataset: str = "fashion_mnist"
    data_dir: Optional[str] = None
    output_dir: str = "runs/dat"
    deepspeed_config: str = "ds_configs/lamb_fp32.json"
    backbone: str = "resnet18"
    stem: str = "auto"
    epochs: int = 5
    stop_after: Optional[int] = None  # end this invocation after N epochs; --resume continues
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    seed: int = 0
    attack: str = "pgd"
    eps: float = 0.1
    alpha: Optional[float] = None
    steps: Optional[int] = None  # None: the attack's own default (PGD 10, FGSM-RS 1, Free 4, ConAdv 1)
    tau: int = 1
    bn_mode: str = "eval"
    loss: str = "madry"
    lam: float = 1.0
    beta: float = 6.0
    eval_steps: int = 10
    eval_batch_size: int = 256
    holdout: Optional[int] = None  # None: for fgsm_rs min(1000, 10% of the training set), else 0
    early_stop: bool = True
    co_drop: float = 0.2
    compressor: str = "none"
    bits: int = 8
    bucket_size: Optional[int] = None  # None: the compressor's default (QSGD 512, ef_sign 2048)
    topology: str = "one-sided"
    sign_momentum: float = 0.0
    byzantine_ranks: tuple = ()
    byzantine_mode: Optional[str] = None  # None: the compressor's default
    resume: bool = False
    save_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: at epoch ends only
    max_nonfinite: int = 10  # consecutive skipped (non-finite) steps that stop the run; 0: never stop
    wandb: bool = False
    wandb_project: str = "dat-ds"
    num_workers: int = 0
    img_size: Optional[int] = None
    classes: Optional[str] = None  # e.g. "0-4" or "5,6,7": only these classes, relabelled 0..k-1
    attack_kwargs: dict = field(default_factory=dict)  # further settings of the attack (e.g. Smooth-AT's sigma)
    loss_kwargs: dict = field(default_factory=dict)  # further settings of the objective

    def validate(self) -> None:
        """Check every setting before any work (no DeepSpeed, no data); bad ones raise ValueError."""
        from .data import DATASETS, parse_classes
        for name, low in (("epochs", 1), ("eval_steps", 1), ("holdout", 0), ("eval_batch_size", 1),
                          ("stop_after", 1), ("train_limit", 1), ("eval_limit", 1), ("img_size", 8),
                          ("num_workers", 0), ("seed", 0), ("save_every", 0), ("max_nonfinite", 0), ("tau", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        for name in ("lam", "beta", "sign_momentum"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.co_drop <= 1:
            raise ValueError(f"--co-drop must lie in (0, 1], got {self.co_drop}")
        check_backbone(self.backbone)
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        parse_classes(self.classes)  # syntax; ids are checked against the dataset when it loads
        if Path(self.output_dir).is_file():
            raise ValueError(f"--output-dir {self.output_dir} is a file, not a folder")
        if not all(v is None or math.isfinite(float(v)) for v in (self.eps, self.alpha)):
            raise ValueError(f"--eps and --alpha must be finite numbers, got {self.eps} and {self.alpha}")
        self.make_objective()
        self.make_compressor()  # checks compressor name and settings
        self.make_attack()  # checks attack name, eps, alpha, steps
        self.make_eval_attack()

    def validate_world(self, world_size: int) -> None:
        """The settings that depend on the number of ranks."""
        outside = [r for r in self.byzantine_ranks if not 0 <= r < world_size]
        if outside:
            raise ValueError(f"--byzantine-ranks: rank {outside[0]} does not exist in a world of {world_size} "
                             f"rank(s) (ranks are 0..{world_size - 1})")

    def make_objective(self) -> objectives.Objective:
        kw = {"mix": {"lam": self.lam}, "trades": {"beta": self.beta}}.get(self.loss, {})
        return objectives.create(self.loss, **kw, **self.loss_kwargs)

    def make_attack(self) -> attacks.Attack:
        kw = {"eps": self.eps, "alpha": self.alpha, "bn_mode": self.bn_mode,
              "loss": self.make_objective().attack_loss}
        if self.steps is not None:
            kw["steps"] = self.steps
        if self.attack == "conadv":
            kw["tau"] = self.tau
        return attacks.create(self.attack, **kw, **self.attack_kwargs)

    def make_compressor(self) -> compress.Compressor:
        """The gradient exchange; only the settings the chosen compressor takes are passed on."""
        kw = {"bits": self.bits, "bucket_size": self.bucket_size, "topology": self.topology,
              "momentum": self.sign_momentum, "byzantine_ranks": tuple(self.byzantine_ranks),
              "byzantine_mode": self.byzantine_mode}
        takes = inspect.signature(compress.COMPRESSORS.get(self.compressor)).parameters
        return compress.create(self.compressor, **{k: v for k, v in kw.items() if k in takes and v is not None})

    def make_eval_attack(self, steps: Optional[int] = None) -> attacks.Attack:
        """PGD at the training eps: what ``robust_acc`` means in every summary."""
        name = "pgd_l2" if attacks.ATTACKS.get(self.attack).norm == "l2" else "pgd"
        return attacks.create(name, eps=self.eps, steps=steps or self.eval_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _to_device(loader, device) -> Iterator:
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def adversarial_batches(engine, batches: Iterator, attack: attacks.Attack, timers: Timers,
                        carry: Optional[dict] = None) -> Iterator:
    """Yield ``(x, x_adv, y)``; ConAdv batches come one step ahead, from the weights before the update.

    For ConAdv, ``carry["pending"]`` holds the look-ahead batch and its attack while a batch is
    being trained (what a mid-epoch checkpoint saves); a ``carry["pending"]`` of ``(x, y, x_adv)``
    given on entry resumes with it instead of drawing a first batch.
    """
    if not getattr(attack, "stale_weights", False):
        for x, y in batches:
            with timers("attack"), autocast(engine):
                x_adv = attack.perturb(engine.module, x, y)
            yield x, x_adv, y
        return
    carry = {} if carry is None else carry
    resumed = carry.pop("pending", None)
    if resumed is not None:
        current, handle = (resumed[0], resumed[1]), (resumed[2], None)
    else:
        current = next(batches, None)
        if current is None:
            return
        with timers("attack"), autocast(engine):
            handle = attack.launch(engine.module, *current)
    for following in batches:
        x_adv = attack.collect(handle)
        with timers("attack"), autocast(engine):  # runs beside the update of `current` on a GPU
            handle = attack.launch(engine.module, *following)
        carry["pending"] = (following, handle)
        yield current[0], x_adv, current[1]
        current = following
    carry.pop("pending", None)
    yield current[0], attack.collect(handle), current[1]


def update(engine, compressor: compress.Compressor, timers: Timers, loss: torch.Tensor,
           guard: Optional[StepGuard] = None, where: str = "") -> Tuple[int, bool]:
    """Backward, gradient exchange at accumulation boundaries, optimizer step.

    Returns ``(bytes sent, skipped)``: with a ``guard``, a step whose loss or gradients are not
    finite on any rank is skipped on every rank (no exchange, no update).
    """
    with timers("backward"):
        engine.backward(loss)
    sent, skipped_before = 0, engine.skipped_steps
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary:
        if guard is not None:
            with timers("step"):
                skip = guard.agree(loss, [p.grad for p in engine.module.parameters() if p.grad is not None])
            if skip:
                with timers("step"):
                    skip_step(engine)
                return 0, guard.stepped(skipped_before, where)
        with timers("codec"):  # encode + decode; the collectives' own time moves to "comm"
            stats = exchange_gradients(engine, compressor)
        timers.move("codec", "comm", stats.comm_seconds)
        sent = stats.bytes_sent
    with timers("step"):
        engine.step()
    skipped = guard.stepped(skipped_before, where) if guard is not None and boundary else False
    return sent, skipped


@dataclass
class EpochState:
    """Where an epoch stands: what a mid-epoch checkpoint records and a resumed epoch starts from."""
    epoch: int = 0
    done: int = 0  # minibatches trained
    drawn: int = 0  # minibatches taken from the loader (ConAdv holds one more, in ``carry``)
    carry: dict = field(default_factory=dict)


def train_epoch(engine, loader, attack: attacks.Attack, compressor: compress.Compressor, timers: Timers,
                objective: objectives.Objective = objectives.Madry(), progress=None,
                guard: Optional[StepGuard] = None, state: Optional[EpochState] = None, totals=None,
                at_boundary: Optional[Callable] = None) -> dict:
    """One pass over this rank's shard; returns the mean loss, bytes sent, the step count and
    ``"stopped": True`` when ``at_boundary`` ended it early.

    ``at_boundary(state, totals)`` runs after every optimizer step that completes a minibatch (all
    replays of Free-m, a full gradient accumulation) and returns True to stop; ``state`` and
    ``totals`` resume an epoch part-way (the loader must then start at ``state.drawn``).
    """
    state = state or EpochState()
    totals = totals or _Totals(engine.device)
    if getattr(attack, "replays_minibatch", False):
        return _free_epoch(engine, loader, attack, compressor, timers, objective, progress, guard, state, totals,
                           at_boundary)
    batches = _counted(_to_device(loader, engine.device), state)
    for x, x_adv, y in adversarial_batches(engine, batches, attack, timers, state.carry):
        if guard is not None:
            guard.begin_micro_step()
        with timers("forward"):
            loss = objective(engine, x, x_adv, y)
        boundary = engine.is_gradient_accumulation_boundary()
        sent, skipped = update(engine, compressor, timers, loss, guard, _where(state))
        totals.add(loss, len(y), sent, engine, progress, skipped)
        state.done += 1
        if boundary and at_boundary is not None and at_boundary(state, totals):
            return {**totals.result(), "stopped": True}
    return totals.result()


def _counted(batches: Iterator, state: EpochState) -> Iterator:
    for batch in batches:
        state.drawn += 1
        yield batch


def _where(state: EpochState) -> str:
    return f"epoch {state.epoch}, batch {state.done}"


def _free_epoch(engine, loader, attack: attacks.Free, compressor, timers, objective, progress, guard, state,
                totals, at_boundary) -> dict:
    """Free-m: m replays per minibatch, one backward each for both the weights and the perturbation."""
    for x, y in _counted(_to_device(loader, engine.device), state):
        boundary = False
        for _ in range(attack.steps):
            if guard is not None:
                guard.begin_micro_step()
            with timers("forward"):
                x_adv = attack.adversarial_input(x)
                loss = objective(engine, x, x_adv, y)
            boundary = engine.is_gradient_accumulation_boundary()
            sent, skipped = update(engine, compressor, timers, loss, guard, _where(state))
            if not skipped:  # a non-finite input gradient would poison the perturbation for good
                with timers("attack"):
                    attack.update(x, x_adv)
            totals.add(loss, len(y), sent, engine, progress, skipped)
        state.done += 1
        if boundary and at_boundary is not None and at_boundary(state, totals):
            return {**totals.result(), "stopped": True}
    return totals.result()


class _Totals:
    """Running loss and byte counts, kept on the device (no per-step host sync)."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.seen = self.bytes = self.steps = self.skipped = 0

    def add(self, loss, n, sent, engine, progress, skipped=False):
        if skipped:  # a skipped step's loss is not finite: it stays out of the mean
            self.skipped += 1
        else:
            self.loss += loss.detach().float() * n
            self.seen += n
        self.bytes, self.steps = self.bytes + sent, self.steps + 1
        if progress is not None:
            progress.update(1)
            if self.steps % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{engine.get_lr()[0]:.2e}")

    def result(self) -> dict:
        return {"train_loss": (self.loss / max(self.seen, 1)).item(), "bytes_sent": self.bytes,
                "micro_steps": self.steps}

    def state_dict(self) -> dict:
        return {"loss": self.loss.item(), "seen": self.seen, "bytes": self.bytes, "steps": self.steps,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.loss.fill_(state["loss"])
        self.seen, self.bytes, self.steps = state["seen"], state["bytes"], state["steps"]
        self.skipped = state.get("skipped", 0)


def _progress(total: int, epoch: int):
    if not dist.is_main():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, mininterval=2.0)


class OverfitWatch:
    """Held-out PGD/FGSM check per epoch: keeps the best epoch and flags catastrophic overfitting
    (PGD accuracy collapsing by ``co_drop`` from its best while FGSM accuracy rises; Wong et al. 2020,
    Rice et al. 2020)."""

    def __init__(self, co_drop: float):
        self.co_drop, self.best, self.best_epoch, self.last_fgsm = co_drop, -1.0, None, None

    def observe(self, epoch: int, pgd_acc: float, fgsm_acc: float) -> dict:
        improved = pgd_acc > self.best
        collapsed = (self.best - pgd_acc >= self.co_drop and self.last_fgsm is not None
                     and fgsm_acc > self.last_fgsm)
        if improved:
            self.best, self.best_epoch = pgd_acc, epoch
        self.last_fgsm = fgsm_acc
        return {"holdout_best": improved, "catastrophic_overfitting": collapsed}


@dataclass
class _RunState:
    """What survives from epoch to epoch (and into a checkpoint's client state)."""
    totals: dict
    watch: OverfitWatch
    row: dict = field(default_factory=dict)
    skipped_at_start: int = 0  # engine.skipped_steps when the current epoch began


def train(cfg: TrainConfig, data: Optional[DatasetInfo] = None, loader_fn: Optional[Callable] = None,
          model_fn: Optional[Callable] = None) -> dict:
    """Run DAT end to end; returns the summary that is also written to ``summary.json``.

    ``loader_fn(train_set, micro_batch, rank, world_size, seed, num_workers)`` replaces
    :func:`train_loader` (e.g. labeled + pseudo-labeled batches); its ``sampler`` needs ``set_epoch``.
    ``model_fn(model)`` runs on the freshly built model before DeepSpeed takes it (e.g. loading a
    pre-trained backbone).
    """
    cfg.validate()
    ds_cfg = load_config(cfg.deepspeed_config)
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    micro, gas, global_batch = resolve_batch(ds_cfg, world)
    cfg.validate_world(world)
    data = data or load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.eval_limit, cfg.img_size,
                                cfg.classes)
    holdout = cfg.holdout if cfg.holdout is not None else (
        min(1000, len(data.train) // 10) if cfg.attack == "fgsm_rs" else 0)
    train_set, holdout_set = data.train.split_off(holdout)

    seed_everything(cfg.seed)  # same initial weights on every rank (DeepSpeed also broadcasts them)
    model = create_model(cfg.backbone, data.num_classes, data.in_chans, data.img_size, data.mean, data.std,
                         stem=cfg.stem)
    if model_fn is not None:
        model = model_fn(model)
    loader = (loader_fn or train_loader)(train_set, micro, rank, world, cfg.seed, cfg.num_workers)
    attack, eval_attack, objective = cfg.make_attack(), cfg.make_eval_attack(), cfg.make_objective()
    replays = attack.steps if getattr(attack, "replays_minibatch", False) else 1
    passes = math.ceil(cfg.epochs / replays)  # Free-m: epochs / m passes, the same number of updates
    engine = initialize(model, ds_cfg, max(1, len(loader) * replays // gas), passes)
    seed_everything(cfg.seed + 1000 * (rank + 1))  # attack noise differs per rank

    compressor = cfg.make_compressor()
    test_loader = eval_loader(data.test, cfg.eval_batch_size, rank, world, cfg.num_workers)
    holdout_loader = eval_loader(holdout_set, cfg.eval_batch_size, rank, world) if holdout_set else None
    out, ckpt_dir = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    meta = {"backbone": cfg.backbone, "stem": cfg.stem, "attack": cfg.attack, "eps": cfg.eps, **data.meta()}

    run = _RunState({"compute_s": 0.0, "comm_s": 0.0, "bytes_sent_per_rank": 0}, OverfitWatch(cfg.co_drop))
    stop = StopSignal()
    guard = StepGuard(engine, cfg.max_nonfinite, stop)
    begin, partial = EpochState(), {}
    if cfg.resume:
        begin, partial = _resume(engine, ckpt_dir, meta, attack, compressor, run, guard)
    logger = RunLogger(out, dataclasses.asdict(cfg) | {"world_size": world, "global_batch_size": global_batch,
                                                       "passes": passes}, cfg.wandb, cfg.wandb_project,
                       resume=cfg.resume and (begin.epoch > 0 or begin.done > 0), first_epoch=begin.epoch)

    timers, stopped_early = Timers(), False
    last_save = [engine.global_steps]

    def at_boundary(state: EpochState, epoch_totals: _Totals) -> bool:
        """Mid-epoch checkpoint when due (``--save-every`` optimizer steps) or asked to stop."""
        due = cfg.save_every and engine.global_steps - last_save[0] >= cfg.save_every
        if due or guard.stop_requested:
            _save_mid_epoch(engine, ckpt_dir, meta, attack, compressor, timers, run, state, epoch_totals, guard)
            last_save[0] = engine.global_steps
        return guard.stop_requested

    with stop:
        for epoch in range(begin.epoch, passes):
            state = begin if epoch == begin.epoch else EpochState(epoch)
            start_epoch(loader, epoch, state.drawn)
            epoch_totals = _Totals(engine.device)
            if partial and epoch == begin.epoch:
                epoch_totals.load_state_dict(partial["totals"])
                timers.seconds.update(partial["timers"])
                run.skipped_at_start = partial["skipped_at_start"]
            else:
                run.skipped_at_start = engine.skipped_steps
            t0 = time.perf_counter()
            progress = _progress(len(loader) * replays, epoch)
            stats = train_epoch(engine, loader, attack, compressor, timers, objective, progress, guard, state,
                                epoch_totals, at_boundary)
            if progress is not None:
                progress.close()
            if stats.get("stopped"):
                _stopped(guard, state, ckpt_dir)
            hold = _end_epoch(engine, cfg, run, timers, stats, test_loader, eval_attack, holdout_loader, epoch, t0,
                              world)
            logger.log_epoch(run.row)
            _report(run.row)
            save_checkpoint(engine, ckpt_dir, f"epoch{epoch:04d}",
                            {"epoch": epoch, "position": [epoch + 1, 0], "totals": run.totals, "meta": meta,
                             "metrics": run.row, "watch": vars(run.watch), "nonfinite_consecutive": guard.consecutive},
                            _rank_state(engine, attack, compressor), best=hold.get("holdout_best", False),
                            position=(epoch + 1, 0))
            last_save[0] = engine.global_steps
            if guard.stop_agreed() and epoch + 1 < passes:
                _stopped(guard, EpochState(epoch + 1), ckpt_dir)
            if hold.get("catastrophic_overfitting") and cfg.early_stop:
                stopped_early = True
                break
            if cfg.stop_after is not None and epoch + 1 - begin.epoch >= cfg.stop_after and epoch + 1 < passes:
                if dist.is_main():
                    print(f"stopping after {cfg.stop_after} epoch(s) as asked; --resume continues", flush=True)
                return {"stopped_after_epoch": epoch}

    row = run.row
    if holdout_loader is not None and run.watch.best_epoch is not None:
        restore_best(engine, ckpt_dir)  # Rice et al.: the model is the best held-out checkpoint
        with autocast(engine):
            row = {**row, **evaluate(engine.module, test_loader, eval_attack, engine.device)}
    summary = {"clean_acc": row["clean_acc"], "robust_acc": row["robust_acc"], "epochs": cfg.epochs,
               "passes": passes, "world_size": world, "global_batch_size": global_batch, "micro_batch_size": micro,
               "gradient_accumulation_steps": gas, **run.totals, "backbone": cfg.backbone, "attack": cfg.attack,
               "attack_settings": repr(attack), "loss": cfg.loss, "eps": cfg.eps,
               "eval_attack": f"{'pgd_l2' if eval_attack.norm == 'l2' else 'pgd'}-{cfg.eval_steps}",
               "eval_samples": row["eval_samples"], "dataset": data.name, "compressor": cfg.compressor,
               "deepspeed_config": cfg.deepspeed_config, "optimizer": ds_cfg.get("optimizer", {}).get("type", "Lamb"),
               "best_epoch": run.watch.best_epoch, "stopped_early": stopped_early, "output_dir": str(out),
               "skipped_steps": engine.skipped_steps, "global_step": engine.global_steps}
    logger.finish(summary)
    return summary


def _end_epoch(engine, cfg, run: _RunState, timers, stats, test_loader, eval_attack, holdout_loader, epoch, t0,
               world) -> dict:
    """Evaluation, held-out check and the epoch's row (``run.row``); returns the held-out check."""
    phase = timers.reset()
    comm_s, compute_s = (v / world for v in dist.all_reduce_sum(
        [phase.get("comm", 0.0), sum(v for k, v in phase.items() if k != "comm")]))
    with autocast(engine):
        ev = evaluate(engine.module, test_loader, eval_attack, engine.device)
        hold = _holdout_check(engine, holdout_loader, cfg, run.watch, epoch)
    run.totals = {"compute_s": run.totals["compute_s"] + compute_s, "comm_s": run.totals["comm_s"] + comm_s,
                  "bytes_sent_per_rank": run.totals["bytes_sent_per_rank"] + stats["bytes_sent"]}
    run.row = {"epoch": epoch, "lr": engine.get_lr()[0], "train_loss": stats["train_loss"], **ev, **hold,
               "epoch_s": time.perf_counter() - t0, "compute_s": compute_s, "comm_s": comm_s,
               "attack_s": phase.get("attack", 0.0), "codec_s": phase.get("codec", 0.0),
               "bytes_sent_per_rank": stats["bytes_sent"], "global_step": engine.global_steps,
               "skipped_steps": engine.skipped_steps - run.skipped_at_start}
    return hold


def _save_mid_epoch(engine, ckpt_dir, meta, attack, compressor, timers, run: _RunState, state: EpochState,
                    epoch_totals: _Totals, guard: StepGuard) -> None:
    """A checkpoint at a step boundary inside an epoch: everything an epoch-end one has, plus this
    rank's partial totals, its data position and ConAdv's look-ahead batch with its attack."""
    rank_state = _rank_state(engine, attack, compressor)
    rank_state["partial"] = {"totals": epoch_totals.state_dict(), "drawn": state.drawn,
                             "timers": dict(timers.seconds), "skipped_at_start": run.skipped_at_start}
    pending = state.carry.get("pending")
    if pending is not None:
        (x, y), handle = pending
        rank_state["pending"] = [x, y, attack.collect(handle)]
    client = {"epoch": state.epoch - 1, "position": [state.epoch, state.done], "totals": run.totals, "meta": meta,
              "metrics": run.row, "watch": vars(run.watch), "nonfinite_consecutive": guard.consecutive}
    save_checkpoint(engine, ckpt_dir, f"epoch{state.epoch:04d}-batch{state.done:06d}", client, rank_state,
                    position=(state.epoch, state.done))


def _stopped(guard: StepGuard, state: EpochState, ckpt_dir: Path) -> None:
    name = signal.Signals(guard.stop_signum).name if guard.stop_signum else "a signal"
    raise StopRequested(f"stopped by {name} at epoch {state.epoch}, batch {state.done}; the checkpoint in "
                        f"{ckpt_dir} is complete and --resume continues from it", guard.stop_signum or 15)


def _holdout_check(engine, loader, cfg: TrainConfig, watch: OverfitWatch, epoch: int) -> dict:
    if loader is None:
        return {}
    pgd = evaluate(engine.module, loader, cfg.make_eval_attack(), engine.device)
    fgsm = evaluate(engine.module, loader, attacks.create("fgsm_rs", eps=cfg.eps), engine.device)
    out = {"holdout_pgd_acc": pgd["robust_acc"], "holdout_fgsm_acc": fgsm["robust_acc"],
           "holdout_clean_acc": pgd["clean_acc"]}
    out.update(watch.observe(epoch, out["holdout_pgd_acc"], out["holdout_fgsm_acc"]))
    if out["catastrophic_overfitting"] and dist.is_main():
        print(f"WARNING: catastrophic overfitting at epoch {epoch}: held-out PGD accuracy "
              f"{out['holdout_pgd_acc']:.3f} fell from {watch.best:.3f} while FGSM accuracy rose to "
              f"{out['holdout_fgsm_acc']:.3f}" + ("; stopping (best checkpoint kept)" if cfg.early_stop else ""),
              file=sys.stderr, flush=True)
    return out


def _report(row: dict) -> None:
    if dist.is_main():
        extra = f"  held-out PGD {row['holdout_pgd_acc']:.4f}" if "holdout_pgd_acc" in row else ""
        print(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  TA {row['clean_acc']:.4f}  "
              f"RA {row['robust_acc']:.4f}{extra}  compute {row['compute_s']:.1f}s  comm {row['comm_s']:.2f}s",
              flush=True)


def _rank_state(engine, attack, compressor) -> dict:
    """Per-rank state beyond the weights: this rank's buffers (BatchNorm running statistics are
    per rank, and the attacks use them), the attack's (Free-m perturbation, ConAdv weight history)
    and the compressor's (error feedback, momentum)."""
    state = {"buffers": {name: b.detach().clone() for name, b in engine.module.named_buffers()}}
    if hasattr(attack, "state_dict"):
        state["attack"] = attack.state_dict()
    state["compressor"] = compressor.state_dict()
    return state


def _resume(engine, ckpt_dir, meta, attack, compressor, run: _RunState, guard: StepGuard):
    """Load the newest complete checkpoint; returns ``(EpochState to start from, partial-epoch state)``."""
    picked = None
    if dist.is_main():
        try:
            picked = pick_checkpoint(ckpt_dir, meta, dist.world_size())
        except ConfigError as err:
            picked = str(err)
    picked = dist.broadcast_object(picked)
    if isinstance(picked, str):
        raise ConfigError(picked)
    if picked is None:
        return EpochState(), {}
    state, rank_state = load_checkpoint(engine, ckpt_dir, picked[0])
    saved = state.get("meta", {}).get("backbone")
    if saved is not None and saved != meta["backbone"]:
        raise ConfigError(f"--resume: checkpoint in {ckpt_dir} is a {saved}, not a {meta['backbone']}")
    buffers = dict(engine.module.named_buffers())
    for name, value in rank_state.get("buffers", {}).items():
        buffers[name].data.copy_(value)
    if hasattr(attack, "load_state_dict") and "attack" in rank_state:
        attack.load_state_dict(rank_state["attack"])
    compressor.load_state_dict(rank_state.get("compressor", {}))
    run.watch.__dict__.update(state.get("watch", {}))
    run.totals, run.row = state["totals"], state.get("metrics") or {}
    guard.consecutive = state.get("nonfinite_consecutive", 0)
    epoch, done = state.get("position") or (state["epoch"] + 1, 0)
    partial = rank_state.get("partial", {}) if done else {}
    begin = EpochState(epoch, done, partial.get("drawn", 0))
    if "pending" in rank_state:
        begin.carry["pending"] = tuple(t.to(engine.device) for t in rank_state["pending"])
    return begin, partial
