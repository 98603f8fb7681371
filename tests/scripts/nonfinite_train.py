"""Train on Fashion-MNIST with some training images poisoned to NaN (used by the tests).

    deepspeed --num_gpus 2 tests/scripts/nonfinite_train.py --out DIR --poison 5,17,300 --samples 512

Every rank saves its flat parameters to ``DIR/params_rank{r}.pt``; ``--recipe`` runs the whole
trainer instead (``metrics.jsonl``, ``summary.json``, checkpoints in DIR).
"""
import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dat_ds import attacks, cli, compress, dist
from dat_ds.data import load_dataset, start_epoch, train_loader
from dat_ds.engine import initialize
from dat_ds.guard import StepGuard
from dat_ds.metrics import Timers
from dat_ds.models import create_model
from dat_ds.trainer import TrainConfig, seed_everything, train, train_epoch

ROOT = Path(__file__).resolve().parents[2]


class Poisoned(Dataset):
    """Fashion-MNIST images, with the images at ``bad`` indices replaced by NaN."""

    def __init__(self, base, bad):
        self.base, self.bad = base, torch.as_tensor(sorted(bad), dtype=torch.long)

    def __len__(self):
        return len(self.base)

    def __getitems__(self, idx):
        x, y = self.base.__getitems__(idx)
        x[torch.isin(torch.as_tensor(idx), self.bad)] = float("nan")
        return x, y

    def split_off(self, n):
        assert n == 0
        return self, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--poison", default="", help="comma-separated sample indices, or 'all'")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--max-nonfinite", type=int, default=10)
    p.add_argument("--recipe", action="store_true")
    p.add_argument("--defer", default="auto", help="the step guard's agreement: auto, on or off")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    data = load_dataset("fashion_mnist", train_limit=args.samples, eval_limit=32)
    bad = range(args.samples) if args.poison == "all" else [int(i) for i in args.poison.split(",") if i]
    data.train = Poisoned(data.train, bad)
    if args.recipe:
        cfg = TrainConfig(backbone="test_resnet", stem="native", epochs=1, attack_kwargs={"steps": 1}, eval_steps=1,
                          deepspeed_config=str(ROOT / "tests" / "configs" / "tiny_lamb.json"), output_dir=args.out,
                          max_nonfinite=args.max_nonfinite, defer_guard=args.defer)
        train(cfg, data)
        return
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    seed_everything(0)
    model = create_model("test_resnet", 10, 1, 28, data.mean, data.std, stem="native")
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}
    loader = train_loader(data.train, args.micro, rank, world, seed=0)
    engine = initialize(model, cfg, steps_per_epoch=len(loader), epochs=1)
    seed_everything(1000 + rank)
    start_epoch(loader, 0)
    guard = StepGuard(engine, args.max_nonfinite, defer=args.defer)
    stats = train_epoch(engine, loader, attacks.create("pgd", eps=0.1, steps=1), compress.create("none"), Timers(),
                        guard=guard)
    flat = torch.cat([t.detach().reshape(-1) for t in engine.module.parameters()])
    buffers = torch.cat([t.detach().reshape(-1) for t in engine.module.buffers() if t.is_floating_point()])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save({"params": flat, "buffers": buffers, "skipped": engine.skipped_steps, "steps": engine.global_steps,
                "loss": stats["train_loss"], "lr_steps": engine.lr_scheduler.last_epoch, "deferred": guard.deferred},
               Path(args.out) / f"params_rank{rank}.pt")


if __name__ == "__main__":
    cli.run(main)
