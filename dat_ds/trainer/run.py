"""``train(cfg)``: a whole DAT run, read as setup, epoch loop, summary."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import attacks, buffers, dist, ema, faults
from ..checkpoint import BEST, LATEST, SaveRetries
from ..data import DatasetInfo, Placement, bad_samples, check_resume, load_dataset, place, start_epoch, train_loader
from ..engine import initialize, load_config, resolve_batch, restore_best
from ..evaluate import evaluate
from ..guard import StepGuard, StopRequested, StopSignal
from .. import speed
from ..metrics import RunLogger
from ..seeding import seed_everything
from ..timing import Timers
from ..models import create_model
from . import state as ckpt
from .config import TrainConfig
from .holdout import OverfitWatch, holdout_check
from .loop import EpochState, Totals, train_epoch
from .elastic import adapt_batch, place_in_pass, remap_schedule
from .plan import PassPlan, plan_passes


@dataclass
class Run:
    """The pieces of one run, built by :func:`setup` and used by the epoch loop."""
    cfg: TrainConfig
    ds_cfg: dict
    data: DatasetInfo
    engine: object
    attack: object
    eval_spec: object  # the per-epoch robust-accuracy column (a PGDSpec of dat_ds.evaluate)
    objective: object
    compressor: object
    loader: object
    test_set: object
    holdout_set: object
    plan: PassPlan
    updates_per_minibatch: int
    micro: int
    gas: int
    global_batch: int
    meta: dict
    out: Path
    ckpt_dir: Path
    guard: StepGuard
    stop: StopSignal
    progress: ckpt.Progress
    timers: Timers
    saves: SaveRetries
    watchdog: faults.Watchdog  # started by train(); beats and pauses are no-ops before
    last_save: int = 0
    bad_seen: int = 0  # unreadable samples this rank had met when the last epoch ended
    ema: Optional[ema.WeightEma] = None  # the ds_config's "ema": evaluation uses its weights
    picked: Optional[tuple] = None  # (tag, marker) of the checkpoint --resume takes
    placement: Optional[Placement] = None  # --data-placement local: the folder each rank reads

    @property
    def passes(self) -> int:
        return self.plan.passes


def train(cfg: TrainConfig, data: Optional[DatasetInfo] = None, loader_fn: Optional[Callable] = None,
          model_fn: Optional[Callable] = None) -> dict:
    """Run DAT end to end; returns the summary that is also written to ``summary.json``.

    ``loader_fn(train_set, micro_batch, rank, world_size, seed, num_workers)`` replaces
    :func:`train_loader` (e.g. labeled + pseudo-labeled batches); its ``sampler`` needs ``set_epoch``.
    ``model_fn(model)`` runs on the freshly built model before DeepSpeed takes it (e.g. loading a
    pre-trained backbone).
    """
    with faults.exit_on_fault():
        run = setup(cfg, data, loader_fn, model_fn)
    # the step clock runs only inside train_epoch; collectives elsewhere keep the process-group timeout
    with run.watchdog, faults.exit_on_fault(run.watchdog), run.watchdog.paused():
        return _train(run, cfg)


def _train(run: Run, cfg: TrainConfig) -> dict:
    begin, partial = EpochState(), None
    if cfg.resume:
        begin, partial = ckpt.resume(run.engine, run.ckpt_dir, run.picked, run.attack, run.compressor, run.progress,
                                     run.guard, run.ema, cfg.seed, run.loader)
        if run.picked is not None:
            saved_batch = run.picked[1].get("meta", {}).get("batch", {})
            remap_schedule(run.engine, saved_batch.get("global", run.global_batch), run.global_batch)
            begin = place_in_pass(begin, run.plan, run.micro * dist.world_size())
    logger = faults.run_agreed(lambda: RunLogger(
        run.out, dataclasses.asdict(cfg) | {"world_size": dist.world_size(), "global_batch_size": run.global_batch,
                                            "passes": run.passes},
        cfg.wandb, cfg.wandb_project, resume=cfg.resume and (begin.epoch > 0 or begin.done > 0),
        first_epoch=begin.epoch))
    run.last_save = run.engine.global_steps
    stopped_early = False
    with run.stop:
        for epoch in range(begin.epoch, run.passes):
            state = begin if epoch == begin.epoch else EpochState(epoch)
            hold = run_epoch(run, state, partial if epoch == begin.epoch else None)  # evaluates the model saved next
            run.saves(faults.run_agreed, lambda: logger.log_epoch(run.progress.row))
            _report(run.progress.row)
            run.saves(ckpt.save, run.engine, run.ckpt_dir, EpochState(epoch + 1), run.progress, run.meta,
                      ckpt.capture(run.engine, run.attack, run.compressor, ema=run.ema), run.guard,
                      best=hold.get("holdout_best", False))
            run.last_save = run.engine.global_steps
            if run.guard.stop_agreed() and epoch + 1 < run.passes:
                _stopped(run.guard, EpochState(epoch + 1), run.ckpt_dir)
            if hold.get("catastrophic_overfitting") and cfg.early_stop:
                stopped_early = True
                break
            if cfg.stop_after is not None and epoch + 1 - begin.epoch >= cfg.stop_after and epoch + 1 < run.passes:
                if dist.is_main():
                    print(f"stopping after {cfg.stop_after} epoch(s) as asked; --resume continues", flush=True)
                return {"stopped_after_epoch": epoch}
    summary = summarize(run, stopped_early)
    faults.run_agreed(lambda: logger.finish(summary))
    return summary


def setup(cfg: TrainConfig, data: Optional[DatasetInfo], loader_fn, model_fn) -> Run:
    """Check the settings, join the world, load the data, build model, engine and components."""
    cfg.validate()
    ds_cfg = load_config(cfg.deepspeed_config)
    dist.init(timeout=cfg.comm_timeout)
    rank, world = dist.rank(), dist.world_size()
    cfg.validate_world(world)
    local = place(cfg.data_placement, cfg.data_dir, cfg.dataset)  # None: every rank reads one dataset
    if local is None:
        data = data or load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.eval_limit, cfg.img_size,
                                    cfg.classes, **cfg.dataset_kwargs)
        train_set, holdout_set = data.train.split_off(cfg.default_holdout(len(data.train)))
    elif data is not None or loader_fn is not None:
        raise ValueError("--data-placement local: this recipe brings its own dataset or loader; it reads one "
                         "dataset on every rank (--data-placement global)")
    else:
        data = local.load(cfg.img_size, cfg.classes, cfg.train_limit, cfg.eval_limit, cfg.dataset_kwargs)
        train_set, holdout_set = local.split_off(data.train, cfg.default_holdout(len(data.train)))
    out = Path(cfg.output_dir)
    meta = {"backbone": cfg.backbone, "stem": cfg.stem, "attack": cfg.attack, "eps": cfg.eps,
            "eval": {"seed": cfg.seed, "batch_size": cfg.eval_batch_size, "steps": cfg.eval_steps,
                     "limit": cfg.eval_limit},
            "holdout": {"samples": len(holdout_set) if holdout_set else 0, "train_limit": cfg.train_limit},
            **data.meta()}
    if local is not None:
        meta["placement"] = local.layout(len(train_set))
    picked = ckpt.pick(out / "checkpoints", meta) if cfg.resume else None
    check_resume(picked and picked[1], meta)
    micro, gas, global_batch = resolve_batch(ds_cfg, picked[1].get("world_size", world) if picked else world)
    ds_cfg, gas, global_batch, note = adapt_batch(ds_cfg, world, micro, gas, picked and picked[1])
    if note and rank == 0:
        print(note, flush=True)
    meta["batch"] = {"micro": micro, "gas": gas, "global": global_batch, "world_size": world}

    seed_everything(cfg.seed)  # same initial weights on every rank (DeepSpeed also broadcasts them)
    model = create_model(cfg.backbone, data.num_classes, data.in_chans, data.img_size, data.mean, data.std,
                         stem=cfg.stem, pretrained=cfg.pretrained)
    if model_fn is not None:
        model = model_fn(model)
    if cfg.sync_bn:
        model = buffers.sync_batchnorm(model)
    loader = (loader_fn or train_loader)(train_set, micro, rank, world, cfg.seed, cfg.num_workers) if local is None \
        else local.train_loader(train_set, micro, cfg.seed, cfg.num_workers)
    attack = cfg.make_attack()
    replays = attack.shape.updates_per_minibatch(attack)
    plan = plan_passes(len(loader), cfg.epochs, replays, gas)
    # the schedule counts natural epochs of optimizer steps, whatever the shape makes of them
    engine = initialize(model, ds_cfg, plan.updates_per_epoch, plan.schedule_epochs)
    # channels-last only after DeepSpeed's broadcast, which views every weight as bytes
    speed.prepare(engine.module, cfg.channels_last, cfg.compile, engine.device)
    seed_everything(cfg.seed + 1000 * (rank + 1))  # attack noise differs per rank
    stop = StopSignal()
    guard = StepGuard(engine, cfg.max_nonfinite, stop, defer=cfg.defer_guard)
    # in the order they were always made (a component may draw from the RNG when it is made)
    eval_spec, objective, compressor = cfg.eval_spec(), cfg.make_objective(), cfg.make_compressor()
    weight_ema = ema.from_config(ds_cfg, engine.module)
    if cfg.defer_guard == "on":
        reason = guard.why_not_deferred(compressor, attack.shape)
        if reason:
            raise ValueError(f"--defer-guard on: {reason}; use --defer-guard auto or off")
    return Run(cfg=cfg, ds_cfg=ds_cfg, data=data, engine=engine, attack=attack, eval_spec=eval_spec,
               objective=objective, compressor=compressor, loader=loader, test_set=data.test,
               holdout_set=holdout_set or None, plan=plan, updates_per_minibatch=replays, micro=micro, gas=gas,
               global_batch=global_batch, meta=meta, picked=picked,
               out=out, ckpt_dir=out / "checkpoints", guard=guard, stop=stop,
               progress=ckpt.Progress(ckpt.RunTotals(), OverfitWatch(cfg.co_drop)), timers=Timers(engine.device),
               saves=SaveRetries(cfg.save_retries), watchdog=faults.Watchdog(cfg.comm_timeout),
               ema=weight_ema, placement=local)


def run_epoch(run: Run, state: EpochState, partial: Optional[ckpt.PartialEpoch]) -> dict:
    """Train one pass from ``state`` (part-way when resumed), evaluate, and fill ``run.progress.row``;
    returns the held-out check."""
    engine = run.engine
    if getattr(run.loader.sampler, "elastic", False):  # counts in samples: resumable on another world size
        start_epoch(run.loader, state.epoch, consumed=state.consumed(state.drawn, run.micro * dist.world_size()))
    elif state.regrouped:
        raise ValueError("--resume on another number of ranks inside an epoch needs a sampler that counts samples "
                         "(dat_ds.data.ResumableSampler); resume on the checkpoint's number of ranks, or from an "
                         "epoch's end")
    else:
        start_epoch(run.loader, state.epoch, state.drawn)
    totals = Totals(engine.device)
    if partial is not None:
        totals.load_state_dict(partial.totals)
        run.timers.seconds.update(partial.timers)
        run.progress.skipped_at_start = partial.skipped_at_start
    else:
        run.progress.skipped_at_start = engine.skipped_steps
    t0 = time.perf_counter()
    batches = run.plan.batches[state.epoch]
    bar = _progress_bar(batches * run.updates_per_minibatch, state.epoch)
    with run.watchdog.watching():
        stats = train_epoch(engine, run.loader, run.attack, run.compressor, run.timers, run.objective, bar,
                            run.guard, state, totals, lambda s, t: _at_boundary(run, s, t), run.ema, batches,
                            run.cfg.views)
    if bar is not None:
        bar.close()
    if stats.get("stopped"):
        _stopped(run.guard, state, run.ckpt_dir)
    return end_epoch(run, stats, state.epoch, t0)


def _at_boundary(run: Run, state: EpochState, totals: Totals) -> bool:
    """After a minibatch's last optimizer step: a mid-epoch checkpoint when due (``--save-every``
    optimizer steps) or asked to stop; True stops the epoch."""
    engine, cfg = run.engine, run.cfg
    run.watchdog.beat()
    due = cfg.save_every and engine.global_steps - run.last_save >= cfg.save_every
    if due or run.guard.stop_requested:
        run.guard.settle()  # a deferred agreement's counts and LR go into the checkpoint settled
        make_one_model(run)
        rank = ckpt.capture(engine, run.attack, run.compressor, state, totals, run.timers, run.progress, run.ema,
                            run.loader)
        with run.watchdog.paused():
            run.saves(ckpt.save, engine, run.ckpt_dir, state, run.progress, run.meta, rank, run.guard)
        run.last_save = engine.global_steps  # also after a failed save: the next one is due in save_every steps
    return run.guard.stop_requested


def end_epoch(run: Run, stats: dict, epoch: int, t0: float) -> dict:
    """Evaluation, held-out check and the epoch's row (``run.progress.row``); returns the held-out check."""
    engine, cfg, progress = run.engine, run.cfg, run.progress
    phase = run.timers.reset()
    seen = bad_samples(*(ds for ds in (run.loader.dataset, run.test_set, run.holdout_set) if ds is not None))
    comm, compute, bad = dist.all_reduce_sum(
        [phase.get("comm", 0.0), sum(v for k, v in phase.items() if k != "comm"), seen - run.bad_seen])
    comm_s, compute_s, run.bad_seen = comm / dist.world_size(), compute / dist.world_size(), seen
    make_one_model(run)
    with ema_weights(run):
        ev = evaluate_test(run)
        hold = holdout_check(engine.module, run.holdout_set, cfg.eval_spec(), cfg.eps, progress.watch, epoch,
                             cfg.early_stop, cfg.eval_batch_size, cfg.seed, engine.device, run.placement)
    totals = progress.totals
    progress.totals = ckpt.RunTotals(totals.compute_s + compute_s, totals.comm_s + comm_s,
                                     totals.bytes_sent_per_rank + stats["bytes_sent"])
    progress.row = {"epoch": epoch, "lr": engine.get_lr()[0], "train_loss": stats["train_loss"], **ev, **hold,
                    "epoch_s": time.perf_counter() - t0, "compute_s": compute_s, "comm_s": comm_s,
                    "attack_s": phase.get("attack", 0.0), "codec_s": phase.get("codec", 0.0),
                    "bytes_sent_per_rank": stats["bytes_sent"], "global_step": engine.global_steps,
                    "skipped_steps": engine.skipped_steps - progress.skipped_at_start,
                    "bad_samples": int(bad)}  # unreadable images skipped (named on stderr), all ranks
    return hold


def summarize(run: Run, stopped_early: bool) -> dict:
    """The run's summary; with a held-out check, the numbers of its best epoch (Rice et al.)."""
    engine, cfg, progress = run.engine, run.cfg, run.progress
    row = progress.row
    checkpoint = run.ckpt_dir / (run.ckpt_dir / LATEST).read_text().strip()
    if run.holdout_set is not None and progress.watch.best_epoch is not None:
        restore_best(engine, run.ckpt_dir)
        if run.ema is not None:  # the best epoch's EMA weights, from this rank's file of that checkpoint
            run.ema.load_state_dict(torch.load(run.ckpt_dir / BEST / f"rank{dist.rank()}.pt",
                                               weights_only=True)["ema"])
        with ema_weights(run):
            row = {**row, **evaluate_test(run)}
        checkpoint = run.ckpt_dir / BEST
    return {"clean_acc": row["clean_acc"], "robust_acc": row["robust_acc"], "checkpoint": str(checkpoint),
            "weights": "raw" if run.ema is None else "ema", **eval_settings(cfg),
            "epochs": cfg.epochs, "passes": run.passes, "updates": run.plan.updates,
            "world_size": dist.world_size(), "global_batch_size": run.global_batch,
            "micro_batch_size": run.micro, "gradient_accumulation_steps": run.gas,
            **dataclasses.asdict(progress.totals), "backbone": cfg.backbone, "attack": cfg.attack,
            "attack_settings": repr(run.attack), "loss": cfg.loss, "eps": cfg.eps,
            "eval_attack": f"{attacks.name_of(cfg.make_eval_attack())}-{cfg.eval_steps}",
            "eval_samples": row["eval_samples"], "dataset": run.data.name, "compressor": cfg.compressor,
            "deepspeed_config": cfg.deepspeed_config,
            "optimizer": run.ds_cfg.get("optimizer", {}).get("type", "Lamb"),
            "best_epoch": progress.watch.best_epoch, "stopped_early": stopped_early, "output_dir": str(run.out),
            "skipped_steps": engine.skipped_steps, "global_step": engine.global_steps,
            "speed": speed.describe(engine.module).as_dict(),
            "ema": None if run.ema is None else {"decay": run.ema.decay, "warmup": run.ema.warmup}}


def eval_settings(cfg: TrainConfig) -> dict:
    """How the reported TA/RA were measured: ``recipes/evaluate.py --pgd-steps K --seed S
    --batch-size B --eval-limit N`` on the saved checkpoint gives the same figures."""
    return {"eval_steps": cfg.eval_steps, "eval_seed": cfg.seed, "eval_batch_size": cfg.eval_batch_size,
            "eval_limit": cfg.eval_limit}


def make_one_model(run: Run) -> None:
    """Every rank's BatchNorm statistics (and the EMA's) pooled into one set: what is evaluated,
    saved and reported is one model, the same on every rank (:mod:`dat_ds.buffers`)."""
    buffers.sync_module(run.engine.module)
    if run.ema is not None:
        run.ema.sync_buffers()


def evaluate_test(run: Run) -> dict:
    """TA and RA of the model in ``engine.module`` on the test set, measured as the suite does."""
    cfg = run.cfg
    return evaluate(fp32(run.engine.module), run.test_set, run.eval_spec, run.engine.device, cfg.eval_batch_size,
                    cfg.seed, cfg.num_workers, run.placement)


class _Fp32(torch.nn.Module):
    """A view of a module whose weights are bf16 (DeepSpeed's ``"bf16"`` mode) that runs in fp32,
    as the saved weights do when ``recipes/evaluate.py`` loads them into an fp32 model."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.state = {n: t.detach().float() if t.is_floating_point() else t
                      for n, t in [*module.named_parameters(), *module.named_buffers()]}

    def forward(self, x):
        return torch.func.functional_call(self.module, self.state, (x,))


def fp32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when its weights are fp32 (autocast keeps them so), else an fp32 view."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return _Fp32(module)


def ema_weights(run: Run):
    """The EMA weights in ``engine.module`` for an evaluation when the run keeps an EMA."""
    return run.ema.applied() if run.ema is not None else contextlib.nullcontext()


def _progress_bar(total: int, epoch: int):
    if not dist.is_main():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, mininterval=2.0)


def _report(row: dict) -> None:
    if dist.is_main():
        extra = f"  held-out PGD {row['holdout_pgd_acc']:.4f}" if "holdout_pgd_acc" in row else ""
        print(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  TA {row['clean_acc']:.4f}  "
              f"RA {row['robust_acc']:.4f}{extra}  compute {row['compute_s']:.1f}s  comm {row['comm_s']:.2f}s",
              flush=True)


def _stopped(guard: StepGuard, state: EpochState, ckpt_dir: Path) -> None:
    name = signal.Signals(guard.stop_signum).name if guard.stop_signum else "a signal"
    raise StopRequested(f"stopped by {name} at epoch {state.epoch}, batch {state.done}; the checkpoint in "
                        f"{ckpt_dir} is complete and --resume continues from it", guard.stop_signum or 15)
