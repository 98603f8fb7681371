"""The DAT training loop (paper Algorithm 1), shared by every recipe.

One step, one direction: data -> attack on ``engine.module`` (input gradients only, no
communication) -> loss -> ``engine.backward`` (local gradients) -> compressor (the only
gradient communication) -> ``engine.step``. Timers around each phase feed the per-epoch
computation/communication split written to ``metrics.jsonl``.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import attacks, compress, dist
from .data import DatasetInfo, eval_loader, load_dataset, train_loader
from .engine import (autocast, exchange_gradients, initialize, load_checkpoint, load_config, resolve_batch,
                     save_checkpoint)
from .evaluate import evaluate
from .metrics import RunLogger, Timers
from .models import create_model


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
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    seed: int = 0
    attack: str = "pgd"
    eps: float = 0.1
    alpha: Optional[float] = None
    steps: int = 10
    bn_mode: str = "eval"
    eval_steps: int = 10
    eval_batch_size: int = 256
    compressor: str = "none"
    resume: bool = False
    wandb: bool = False
    wandb_project: str = "dat-ds"
    num_workers: int = 0
    img_size: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.eval_steps < 1:
            raise ValueError(f"--eval-steps must be >= 1, got {self.eval_steps}")
        self.make_attack()  # checks attack name, eps, alpha, steps
        self.make_eval_attack()


    def attack_kwargs(self) -> dict:
        kw = {"eps": self.eps, "alpha": self.alpha, "bn_mode": self.bn_mode}
        if self.attack != "fgsm_rs" or self.steps != 10:  # fgsm_rs is one step by definition
            kw["steps"] = self.steps
        return kw

    def make_attack(self) -> attacks.Attack:
        kw = self.attack_kwargs()
        if self.attack == "fgsm_rs":
            kw.pop("steps", None)
        return attacks.create(self.attack, **kw)

    def make_eval_attack(self) -> attacks.Attack:
        """PGD at the training eps: what ``robust_acc`` means in every summary."""
        return attacks.create("pgd", eps=self.eps, steps=self.eval_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def madry_loss(engine, x, x_adv, y) -> torch.Tensor:
    """Madry AT: cross-entropy on the adversarial examples."""
    return F.cross_entropy(engine(x_adv), y)


def train_epoch(engine, loader, attack: attacks.Attack, compressor: compress.Compressor, timers: Timers,
                objective: Callable = madry_loss, progress=None) -> dict:
    """One pass over this rank's shard; returns loss, accuracy on the adversarial batch, bytes sent."""
    device = engine.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = bytes_sent = steps = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with timers("attack"), autocast(engine):
            x_adv = attack.perturb(engine.module, x, y)
        with timers("forward_backward"):
            loss = objective(engine, x, x_adv, y)
            engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            with timers("comm"):
                bytes_sent += exchange_gradients(engine, compressor).bytes_sent
        with timers("step"):
            engine.step()
        loss_sum += loss.detach().float() * len(y)
        seen += len(y)
        steps += 1
        if progress is not None:
            progress.update(1)
            if steps % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{engine.get_lr()[0]:.2e}")
    return {"train_loss": (loss_sum / max(seen, 1)).item(), "bytes_sent": bytes_sent, "micro_steps": steps}


def _progress(total: int, epoch: int):
    if not dist.is_main():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, mininterval=2.0)


def train(cfg: TrainConfig, data: Optional[DatasetInfo] = None, objective: Callable = madry_loss) -> dict:
    """Run DAT end to end; returns the summary that is also written to ``summary.json``."""
    cfg.validate()
    ds_cfg = load_config(cfg.deepspeed_config)
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    data = data or load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.eval_limit, cfg.img_size)
    micro, gas, global_batch = resolve_batch(ds_cfg, world)

    seed_everything(cfg.seed)  # same initial weights on every rank (DeepSpeed also broadcasts them)
    model = create_model(cfg.backbone, data.num_classes, data.in_chans, data.img_size, data.mean, data.std,
                         stem=cfg.stem)
    loader = train_loader(data.train, micro, rank, world, cfg.seed, cfg.num_workers)
    steps_per_epoch = max(1, len(loader) // gas)
    engine = initialize(model, ds_cfg, steps_per_epoch, cfg.epochs)
    seed_everything(cfg.seed + 1000 * (rank + 1))  # attack noise differs per rank

    attack, eval_attack = cfg.make_attack(), cfg.make_eval_attack()
    compressor = compress.create(cfg.compressor)
    test_loader = eval_loader(data.test, cfg.eval_batch_size, rank, world, cfg.num_workers)
    out, ckpt_dir = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    meta = {"backbone": cfg.backbone, "stem": cfg.stem, "attack": cfg.attack, "eps": cfg.eps, **data.meta()}

    start_epoch, totals = 0, {"compute_s": 0.0, "comm_s": 0.0, "bytes_sent_per_rank": 0}
    if cfg.resume:
        state = load_checkpoint(engine, ckpt_dir)
        if state is not None:
            if state["meta"]["backbone"] != cfg.backbone:
                raise ValueError(f"--resume: checkpoint in {ckpt_dir} is a {state['meta']['backbone']}, "
                                 f"not a {cfg.backbone}")
            start_epoch, totals = state["epoch"] + 1, state["totals"]
            seed_everything(cfg.seed + 1000 * (rank + 1) + start_epoch)
    logger = RunLogger(out, dataclasses.asdict(cfg) | {"world_size": world, "global_batch_size": global_batch},
                       cfg.wandb, cfg.wandb_project, resume=cfg.resume and start_epoch > 0)

    timers, row = Timers(), {}
    for epoch in range(start_epoch, cfg.epochs):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        progress = _progress(len(loader), epoch)
        stats = train_epoch(engine, loader, attack, compressor, timers, objective, progress)
        if progress is not None:
            progress.close()
        phase = timers.reset()
        comm_s = dist.all_reduce_sum([phase.get("comm", 0.0)])[0] / world  # mean over ranks
        compute_s = sum(v for k, v in phase.items() if k != "comm")
        compute_s = dist.all_reduce_sum([compute_s])[0] / world
        with timers("eval"), autocast(engine):
            ev = evaluate(engine.module, test_loader, eval_attack, engine.device)
        totals = {"compute_s": totals["compute_s"] + compute_s, "comm_s": totals["comm_s"] + comm_s,
                  "bytes_sent_per_rank": totals["bytes_sent_per_rank"] + stats["bytes_sent"]}
        row = {"epoch": epoch, "lr": engine.get_lr()[0], "train_loss": stats["train_loss"], **ev,
               "epoch_s": time.perf_counter() - t0, "compute_s": compute_s, "comm_s": comm_s,
               "attack_s": phase.get("attack", 0.0), "bytes_sent_per_rank": stats["bytes_sent"],
               "global_step": engine.global_steps}
        logger.log_epoch(row)
        if dist.is_main():
            print(f"epoch {epoch}: loss {row['train_loss']:.4f}  TA {ev['clean_acc']:.4f}  "
                  f"RA {ev['robust_acc']:.4f}  compute {compute_s:.1f}s  comm {comm_s:.2f}s", flush=True)
        save_checkpoint(engine, ckpt_dir, f"epoch{epoch:04d}",
                        {"epoch": epoch, "totals": totals, "meta": meta, "metrics": row})

    if not row:  # resumed a finished run: report its last epoch
        row = load_checkpoint(engine, ckpt_dir)["metrics"]
    summary = {"clean_acc": row["clean_acc"], "robust_acc": row["robust_acc"], "epochs": cfg.epochs,
               "world_size": world, "global_batch_size": global_batch, "micro_batch_size": micro,
               "gradient_accumulation_steps": gas, **totals, "backbone": cfg.backbone, "attack": cfg.attack,
               "eps": cfg.eps, "eval_attack": f"pgd-{cfg.eval_steps}", "eval_samples": row["eval_samples"],
               "dataset": data.name, "compressor": cfg.compressor, "deepspeed_config": cfg.deepspeed_config,
               "optimizer": ds_cfg.get("optimizer", {}).get("type", "Lamb")}
    logger.finish(summary)
    return summary
