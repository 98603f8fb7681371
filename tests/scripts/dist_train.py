"""Train a few DAT steps on every rank and save each rank's flat parameters (used by the tests).

    deepspeed --num_gpus 2 tests/scripts/dist_train.py --out DIR --micro 16 --steps 4
"""
import argparse
from pathlib import Path

import torch

from dat_ds import attacks, compress, dist
from dat_ds.data import load_dataset, train_loader
from dat_ds.engine import initialize
from dat_ds.metrics import Timers
from dat_ds.models import create_model
from dat_ds.trainer import seed_everything, train_epoch

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--micro", type=int, default=16)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--backbone", default="test_resnet")
p.add_argument("--stem", default="native")
p.add_argument("--attack", default="pgd")
p.add_argument("--compressor", default="none")
p.add_argument("--topology", default="one-sided")
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

dist.init()
rank, world = dist.rank(), dist.world_size()
data = load_dataset("fashion_mnist", train_limit=args.micro * world * args.steps)
seed_everything(0)
model = create_model(args.backbone, 10, 1, 28, data.mean, data.std, stem=args.stem)
cfg = {"train_micro_batch_size_per_gpu": args.micro, "zero_optimization": {"stage": 0},
       "optimizer": {"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 1e-4}}}
loader = train_loader(data.train, args.micro, rank, world, seed=0)
engine = initialize(model, cfg, steps_per_epoch=len(loader), epochs=1)
init = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
seed_everything(1000 + rank)
loader.sampler.set_epoch(0)
attack = attacks.create(args.attack, eps=0.1, steps=2) if args.attack != "none" else attacks.create("none")
kw = {} if args.compressor == "none" else {"topology": args.topology}
stats = train_epoch(engine, loader, attack, compress.create(args.compressor, **kw), Timers())
flat = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
Path(args.out).mkdir(parents=True, exist_ok=True)
torch.save({"params": flat, "init": init, "steps": stats["micro_steps"], "bytes": stats["bytes_sent"], "world": world},
           Path(args.out) / f"params_rank{rank}.pt")
