"""Stopping a real 2-rank run inside an epoch, and reading which samples its ranks read."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, clean_env
from dat_ds.dist import free_port
from dat_ds.engine import COMPLETE


def stop_inside_the_epoch(recipe, args, env) -> int:
    """2 ranks under the launcher, SIGTERM once a mid-epoch checkpoint exists: the run saves at the
    next minibatch boundary and exits. Returns the batch of the checkpoint it left."""
    out = Path(args[args.index("--output-dir") + 1])
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(recipe), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not list((out / "checkpoints").glob(f"epoch0000-batch*/{COMPLETE}")):
            assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by SIGTERM" in log, log[-3000:]
    return int((out / "checkpoints" / "latest").read_text().strip().split("batch")[1])


def read_ids(log: Path) -> dict:
    """Per rank file, the minibatches of sample ids it read, in order (one line per minibatch)."""
    return {p.name: [[int(i) for i in line.split()] for line in p.read_text().splitlines()]
            for p in sorted(log.parent.glob(log.name + ".rank*"))}
