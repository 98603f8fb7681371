"""Labeled + pseudo-labeled batches on every rank (used by the tests).

    deepspeed --num_gpus 2 tests/scripts/semisup_shards.py --pseudo-labels FILE.npz --out DIR

Reads the pseudo-label file from disk, builds the training loader of semi-supervised DAT over
the first ``--labeled`` Fashion-MNIST training images, runs ``--epochs`` epochs of it and writes
``rank{r}.pt``: per epoch, the labeled and pool indices of every batch this rank read, and
whether each batch's tensors equal the samples at those indices.
"""
import argparse
from pathlib import Path

import torch

from dat_ds import dist
from dat_ds.data import load_dataset
from dat_ds.semisup import load_pseudo_labels, mixed_loader_fn

p = argparse.ArgumentParser()
p.add_argument("--pseudo-labels", required=True)
p.add_argument("--out", required=True)
p.add_argument("--labeled", type=int, default=600)
p.add_argument("--micro", type=int, default=20)
p.add_argument("--fraction", type=float, default=0.3)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

dist.init()
rank, world = dist.rank(), dist.world_size()
labeled = load_dataset("fashion_mnist", train_limit=args.labeled).train
pool = load_pseudo_labels(args.pseudo_labels)
loader = mixed_loader_fn(pool, args.fraction)(labeled, args.micro, rank, world, seed=3)
result = {"world": world, "batches": len(loader), "epochs": []}
for epoch in range(args.epochs):
    loader.sampler.set_epoch(epoch)
    lab, unl = loader.sampler.epoch_indices()
    matches = []
    for b, (x, y) in enumerate(loader):
        want_x = torch.cat([labeled.images[lab[b]], pool.images[unl[b]]]).float() / 255
        want_y = torch.cat([labeled.labels[lab[b]], pool.labels[unl[b]]])
        matches.append(bool(torch.equal(x, want_x) and torch.equal(y, want_y)))
    result["epochs"].append({"labeled": lab, "pool": unl, "matches": matches})
Path(args.out).mkdir(parents=True, exist_ok=True)
torch.save(result, Path(args.out) / f"rank{rank}.pt")
