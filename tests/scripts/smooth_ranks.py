"""Certification counts (and, with --train, two Smooth-AT steps) on every rank (used by the tests).

    deepspeed --num_gpus 2 tests/scripts/smooth_ranks.py --out DIR --train   # 2 ranks
    python tests/scripts/smooth_ranks.py --out DIR                            # 1 rank, same counts

Writes ``rank{r}.pt`` with the class counts, CERTIFY and PREDICT results of a fixed random conv
net on a few fixed inputs, the draw batches this rank evaluated, and (``--train``) the batch
sizes that reached the model in the attack and in the training forward plus the final weights.
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn

from dat_ds import compress, dist, smoothing
from dat_ds.engine import initialize
from dat_ds.metrics import Timers

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--train", action="store_true")
p.add_argument("--micro", type=int, default=8)
p.add_argument("--copies", type=int, default=4)
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

SIGMA, N0, N, BATCH = 0.2, 64, 2000, 256

dist.init()
rank, world = dist.rank(), dist.world_size()
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10)).eval()
inputs = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
result = {"world": world, "counts": [], "certify": [], "predict": [],
          "local_batches": [k for k, _ in smoothing.rank_batches(N, BATCH, rank, world)]}
for i, x in enumerate(inputs):
    result["counts"].append(smoothing.sample_counts(net, x, SIGMA, N, BATCH, seed=(7, i)))
    result["certify"].append(smoothing.certify(net, x, SIGMA, N0, N, 0.001, BATCH, seed=(7, i)))
    result["predict"].append(smoothing.predict(net, x, SIGMA, N, 0.001, BATCH, seed=(7, i)))

if args.train:
    from dat_ds.data import load_dataset, train_loader
    from dat_ds.models import create_model
    from dat_ds.trainer import seed_everything, train_epoch
    data = load_dataset("fashion_mnist", train_limit=args.micro * world * 2)
    seed_everything(0)
    model = create_model("test_resnet", 10, 1, 28, data.mean, data.std, stem="native")
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "zero_optimization": {"stage": 0},
           "optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}
    loader = train_loader(data.train, args.micro, rank, world, seed=0)
    engine = initialize(model, cfg, steps_per_epoch=len(loader), epochs=1)
    seen = {"attack": [], "train": []}
    engine.module.register_forward_pre_hook(
        lambda m, a: seen["train" if m.training else "attack"].append(len(a[0])))
    seed_everything(1000 + rank)
    loader.sampler.set_epoch(0)
    noise = {"sigma": 0.25, "noise_copies": args.copies}
    attack = smoothing.SmoothPGDL2(eps=0.5, steps=2, **noise)
    stats = train_epoch(engine, loader, attack, compress.create("none"), Timers(), smoothing.SmoothCE(**noise))
    result.update(seen=seen, steps=stats["micro_steps"],
                  params=torch.cat([q.detach().reshape(-1) for q in engine.module.parameters()]))

Path(args.out).mkdir(parents=True, exist_ok=True)
torch.save(result, Path(args.out) / f"rank{rank}.pt")
