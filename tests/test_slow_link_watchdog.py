"""Slow links and --comm-timeout: the watchdog measures the time between optimizer steps (the
process group bounds each collective by the same figure), never a run's length, so slow exchanges
that each fit inside the timeout never end a run, however many there are; and at its default the
timeout holds a resnet18 exchange over a 100 Mbit/s, 40 ms link many times over."""
import subprocess
import sys

from conftest import ROOT, clean_env
from dat_ds import dist, faults

STEPS = """
import sys, time
from dat_ds import faults
timeout, collective_s, steps = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
with faults.Watchdog(timeout) as w, w.paused():  # as dat_ds.trainer runs: paused, watching the epoch
    with w.watching():
        for _ in range(steps):
            time.sleep(collective_s)  # a slow fake collective: one step's gradient exchange on a slow link
            w.beat()  # the trainer's beat after each optimizer step
print("trained", w.steps, "steps", flush=True)
"""


def steps(timeout: float, collective_s: float, n: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STEPS, str(timeout), str(collective_s), str(n)], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)


def test_slow_exchanges_each_inside_the_timeout_never_end_the_run():
    r = steps(1.5, 0.5, 8)  # 4 s of exchanges under a 1.5 s timeout
    assert r.returncode == 0 and "trained 8 steps" in r.stdout, r.stderr[-2000:]


def test_one_exchange_longer_than_the_timeout_ends_the_run():
    r = steps(1.0, 4.0, 1)
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == faults.EXIT_COMM and "trained" not in r.stdout, r.stderr[-2000:]
    assert len(lines) == 1 and "no step progress for 1 s (--comm-timeout)" in lines[0]


def test_the_default_timeout_holds_a_resnet18_exchange_on_a_100_mbit_40_ms_link():
    """fp32 all-reduce of resnet18's gradient between two nodes (ring: each sends its half and
    receives the other, twice): the bytes at 100 Mbit/s plus a round trip per chunk of gloo's ring."""
    from dat_ds.models import create_model
    params = sum(p.numel() for p in create_model("resnet18", 10, 1, 28, (0.5,), (0.5,)).parameters())
    transfer_s = 4 * params * 8 / 100e6  # both halves once each way, twice: the whole gradient's bytes
    round_trips_s = 0.040 * 2 * 64  # generously, 64 round trips per phase
    assert 11e6 < params < 12e6 and transfer_s + round_trips_s < dist.DEFAULT_COMM_TIMEOUT / 50
