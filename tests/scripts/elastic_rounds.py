"""One all-reduce per round of torchrun's elastic agent; rank 1 kills itself in the first round
(used by tests/test_launchers.py).

    torchrun --nnodes 1:2 --nproc-per-node 2 --max-restarts 1 --rdzv-backend c10d ... \\
        tests/scripts/elastic_rounds.py --out DIR

Each rank of each round whose world forms writes ``DIR/round{R}_rank{r}.txt``: the all-reduced sum
and the world size.
"""
import argparse
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from dat_ds import dist

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()

restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if restart and os.environ["RANK"] == "1":
    time.sleep(3)  # a rank that starts after its peers (a slower node): they have set their keys by then
dist.init(timeout=60)
rank = dist.rank()
total = torch.tensor([rank + 1.0])
tdist.all_reduce(total)
(Path(args.out) / f"round{restart}_rank{rank}.txt").write_text(f"{total.item():g} {dist.world_size()}")
if restart == 0 and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # a rank lost after the world formed: the agent restarts the group
tdist.barrier()
