"""A step loop with one all-reduce per step under the watchdog (used by the fault tests).

    deepspeed --num_gpus 2 tests/scripts/hang_ranks.py --out DIR --comm-timeout 5

Every rank writes ``rank{r}.step`` (its pid and step count) after each step, so a test can stop
one rank mid-run and watch the others give up.
"""
import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from dat_ds import dist, faults

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--comm-timeout", type=float, default=5.0)
p.add_argument("--steps", type=int, default=100000)
p.add_argument("--step-seconds", type=float, default=0.05)
p.add_argument("--watchdog-factor", type=float, default=1.0,
               help="the watchdog waits this many times --comm-timeout (large: the process-group timeout acts first)")
p.add_argument("--local_rank", type=int, default=0)
args = p.parse_args()

dist.init(timeout=args.comm_timeout)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
with faults.Watchdog(args.comm_timeout * args.watchdog_factor) as watchdog, faults.exit_on_fault(watchdog):
    for step in range(args.steps):
        time.sleep(args.step_seconds)  # the step's compute
        flags = torch.ones(2)
        tdist.all_reduce(flags)
        watchdog.beat()
        (out / f"rank{dist.rank()}.step").write_text(f"{os.getpid()} {step + 1}")
