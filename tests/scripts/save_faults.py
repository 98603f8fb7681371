"""Checkpoint saves that fail on one rank or on a full disk (used by the fault tests).

    deepspeed --num_gpus 2 tests/scripts/save_faults.py --ckpt DIR --out DIR [--fail-rank 1] [--fill]

Saves ``good`` (which must succeed), then makes the next save fail (``--fail-rank R``: rank R's
write raises ENOSPC; ``--fill``: a file fills the disk) and tries ``bad``, then ``again`` with one
retry allowed. Each rank writes what it saw to ``OUT/rank{r}.json``.
"""
import argparse
import errno
import json
import os
from pathlib import Path

import torch

from dat_ds import checkpoint, dist, faults
from dat_ds.engine import initialize

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--out", required=True)
p.add_argument("--fail-rank", type=int, default=None)
p.add_argument("--fill", action="store_true")
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

dist.init(timeout=60)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
engine = initialize(model, {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
                            "optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}, steps_per_epoch=1, epochs=1)
ckpt = Path(args.ckpt)
seen = {}


def save(tag, position):
    checkpoint.save_checkpoint(engine, ckpt, tag, {"meta": {"backbone": "mlp"}}, {}, position=position)


save("good", (1, 0))
if args.fail_rank == dist.rank():
    def broken(obj, path, zipfile=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    checkpoint._torch_save = broken
if args.fill and dist.is_main():
    with open(ckpt / "filler", "wb", buffering=0) as f:  # fill the file system up to the last block
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
dist.barrier()
try:
    save("bad", (2, 0))
    seen["bad"] = "saved"
except faults.WriteFailed as err:
    seen["bad"] = str(err)
retries = checkpoint.SaveRetries(1)
seen["again"] = retries(save, "again", (3, 0))
seen["latest"] = (ckpt / "latest").read_text()
seen["tags"] = sorted(t for t, _ in checkpoint.complete_checkpoints(ckpt))
seen["dirs"] = sorted(d.name for d in ckpt.iterdir() if d.is_dir())
Path(args.out).mkdir(parents=True, exist_ok=True)
(Path(args.out) / f"rank{dist.rank()}.json").write_text(json.dumps(seen))
