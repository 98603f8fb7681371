"""Fault table: inject each fault into a real 2-rank run, measure detection, loss and resume.

Every fault hits a run of ``test_resnet`` on 640 Fashion-MNIST images (2 ranks x 32, 10 steps per
epoch, 2 epochs, a mid-epoch checkpoint every 3 steps) 1.5 step times after its first mid-epoch
checkpoint; then ``--resume`` finishes it and its final weights are compared with a run that went
straight through, in the same invocation (the baseline).

* time to detection: from the injection to the first line that names the fault (for SIGKILL, the
  surviving rank's line), and to the end of the whole job (the launcher's 30 s grace included);
* lost: the training time between the newest complete checkpoint and the injection, and the
  optimizer steps it holds at the straight run's step time;
* resume: whether the resumed run ends with the straight run's weights bit for bit.

    python bench/fault_bench.py                          # every fault (about 15 minutes on 2 cores)
    python bench/fault_bench.py --faults hung sigterm    # some of them; the others keep their rows
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import RESULTS, fill_disk, machine, save  # noqa: E402

SCRIPT = ROOT / "tests" / "scripts" / "fault_train.py"
RUN = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "640", "--eval-limit", "32",
       "--steps", "2", "--eval-steps", "1", "--epochs", "2", "--save-every", "3",
       "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]
STEPS_PER_EPOCH = 10
COMM_TIMEOUT = 15
INJECT_AFTER_STEPS = 1.5  # step times after the first mid-epoch checkpoint (--save-every 3)
FAULTS = {"hung": "hung rank (SIGSTOP of rank 1)", "disk": "full disk (output file system filled)",
          "worker": "dead loader worker (SIGKILL, --num-workers 1)", "sigkill": "SIGKILL of rank 1",
          "sigterm": "SIGTERM to the launcher (launch.py)",
          "node": "lost node: 4 ranks on 2 launchers, a rank of node 1 SIGKILLed, resumed on the 2 ranks of node 0"}


def env() -> dict:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(SCRIPT), *map(str, RUN), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


class Watch:
    """Reads a run's output in a thread and notes when the first line naming the fault came."""

    MARKS = (": error: ", "stopped by SIGTERM")

    def __init__(self, proc):
        self.proc, self.lines, self.first = proc, [], None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.first is None and any(m in line for m in self.MARKS):
                self.first = (time.monotonic(), line.strip())

    def wait(self, timeout):
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return time.monotonic()


def ranks(proc):
    kids = psutil.Process(proc.pid).children(recursive=True)
    found = [k for k in kids if str(SCRIPT) in " ".join(k.cmdline()) and "--local_rank" in " ".join(k.cmdline())]
    return sorted(found, key=lambda k: " ".join(k.cmdline()))


def wait_for_checkpoint(proc, ckpt_dir: Path, timeout=900) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = sorted(ckpt_dir.glob("epoch0000-batch*/complete.json"))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise RuntimeError("the run ended before its first mid-epoch checkpoint")
        time.sleep(0.05)
    raise RuntimeError("no mid-epoch checkpoint appeared")


def inject(name: str, proc, out: Path, disk: Path):
    """Inject fault ``name``; returns the injection time and an undo (run before resuming)."""
    undo = lambda: None  # noqa: E731
    if name == "hung":
        ranks(proc)[1].suspend()
    elif name == "disk":
        filler = fill_disk(disk)
        undo = filler.unlink
    elif name == "worker":
        workers = []
        while not workers and proc.poll() is None:
            workers = ranks(proc)[0].children()
        workers[0].kill()
    elif name == "sigkill":
        ranks(proc)[1].kill()
    elif name == "sigterm":
        [p for p in psutil.Process(proc.pid).children(recursive=True)
         if "deepspeed.launcher.launch" in " ".join(p.cmdline())][0].terminate()
    return time.monotonic(), undo


def final_weights(out: Path) -> dict:
    tag = (out / "checkpoints" / "latest").read_text()
    return torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def newest_complete(ckpt_dir: Path):
    markers = []
    for m in ckpt_dir.glob("*/complete.json"):
        if m.parent.name != "best":
            info = json.loads(m.read_text())
            markers.append((tuple(info["position"]), m))
    return max(markers)[1] if markers else None


def launch_nodes(args, port: int, hostfile: Path):
    """Two launchers (``--no_ssh --node_rank``) of 2 ranks each: one 4-rank world on this machine."""
    return [subprocess.Popen([str(Path(sys.executable).with_name("deepspeed")), "--hostfile", str(hostfile), "--no_ssh",
                              "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                              str(SCRIPT), *map(str, RUN), *map(str, args)],
                             cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for node in (0, 1)]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def run_lost_node(work: Path, straight2: dict, step_s: float) -> dict:
    """A 4-rank run on 2 "nodes" loses a rank; the 2 ranks of node 0 resume it (another world size)."""
    hostfile = work / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    straight = work / "straight4"
    procs = launch_nodes(["--output-dir", straight], free_port(), hostfile)
    for proc in procs:
        proc.communicate(timeout=1800)
    if any(proc.returncode for proc in procs):
        return {"fault": FAULTS["node"], "note": "the straight 4-rank run failed: not measured"}
    out = work / "node" / "run"
    extra = ["--output-dir", out, "--comm-timeout", COMM_TIMEOUT]
    procs = launch_nodes(extra, free_port(), hostfile)
    watches = [Watch(proc) for proc in procs]
    try:
        wait_for_checkpoint(procs[0], out / "checkpoints")
        time.sleep(INJECT_AFTER_STEPS * step_s)
        victim = ranks(procs[1])[0]
        victim.kill()
        t_inject = time.monotonic()
        t_end = max(w.wait(timeout=COMM_TIMEOUT + 300) for w in watches)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    marker = newest_complete(out / "checkpoints")
    info = json.loads(marker.read_text())
    resumed = subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                              str(free_port()), str(SCRIPT), *map(str, RUN), *map(str, extra[:2]), "--resume"],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    firsts = [w.first for w in watches if w.first]
    first = min(firsts) if firsts else None
    row = {"fault": FAULTS["node"], "exit_code": procs[0].returncode,
           "detected_s": round(first[0] - t_inject, 1) if first else None, "job_end_s": round(t_end - t_inject, 1),
           "resumed_from": info["tag"],
           "resume": "completes on 2 ranks" if resumed.returncode == 0 else f"failed (exit {resumed.returncode})",
           "line": (first[1].split(": error: ", 1)[-1].replace(str(out), "OUTPUT_DIR")[:160] if first else "")}
    if resumed.returncode == 0:
        got, base4 = summary(out), summary(straight)
        row.update({"TA": got["clean_acc"], "RA": got["robust_acc"], "straight_4_ranks_TA": base4["clean_acc"],
                    "straight_4_ranks_RA": base4["robust_acc"], "straight_2_ranks_TA": straight2["clean_acc"],
                    "straight_2_ranks_RA": straight2["robust_acc"],
                    "resumed_line": next((ln for ln in (resumed.stdout + resumed.stderr).splitlines()
                                          if "resumed a " in ln), "")})
    return row


def run_fault(name: str, work: Path, straight: dict, step_s: float) -> dict:
    disk = work / f"disk_{name}"
    disk.mkdir()
    if name == "disk":
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True)
        if r.returncode != 0:
            return {"fault": FAULTS[name], "detected_s": None, "note": "tmpfs mount not permitted: not measured"}
    out = disk / "run"
    extra = ["--output-dir", out, "--comm-timeout", COMM_TIMEOUT]
    if name == "worker":
        extra += ["--num-workers", "1"]
    proc = launch(extra)
    watch = Watch(proc)
    try:
        wait_for_checkpoint(proc, out / "checkpoints")
        time.sleep(INJECT_AFTER_STEPS * step_s)  # mid-way between two checkpoints, not right after one
        t_inject, undo = inject(name, proc, out, disk)
        t_end = watch.wait(timeout=COMM_TIMEOUT + 300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    marker = newest_complete(out / "checkpoints")
    info = json.loads(marker.read_text())
    lost_s = max(0.0, time.time() - (time.monotonic() - t_inject) - marker.stat().st_mtime)
    undo()
    resumed = subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                              str(free_port()), str(SCRIPT), *map(str, RUN), *map(str, extra[:2]),
                              *(["--num-workers", "1"] if name == "worker" else []), "--resume"],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    exact = resumed.returncode == 0 and same(straight, final_weights(out))
    if name == "disk":
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    first = watch.first
    return {"fault": FAULTS[name], "exit_code": proc.returncode,
            "detected_s": round(first[0] - t_inject, 1) if first else None,
            "job_end_s": round(t_end - t_inject, 1), "resumed_from": info["tag"],
            "lost_s": round(lost_s, 1), "lost_steps": round(lost_s / step_s, 1),
            "resume": ("bit-exact" if exact else "completes, weights differ" if resumed.returncode == 0
                       else f"failed (exit {resumed.returncode})"),
            "line": (first[1].split(": error: ", 1)[-1].replace(str(out), "OUTPUT_DIR")[:160] if first else "")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="faults_") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        r = subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                            str(free_port()), str(SCRIPT), *map(str, RUN), "--output-dir", str(work / "straight")],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            sys.exit(f"the straight run failed: {r.stderr[-2000:]}")
        straight_s = time.monotonic() - t0
        rows = [json.loads(line) for line in (work / "straight" / "metrics.jsonl").read_text().splitlines()]
        step_s = sum(row["epoch_s"] for row in rows) / (len(rows) * STEPS_PER_EPOCH)
        straight = final_weights(work / "straight")
        results = {}
        for name in args.faults:
            results[name] = (run_lost_node(work, summary(work / "straight"), step_s) if name == "node"
                             else run_fault(name, work, straight, step_s))
            print(json.dumps(results[name]), flush=True)
    previous = {}
    path = RESULTS / "faults.json"
    if path.is_file():
        previous = {row["key"]: row for row in json.loads(path.read_text()).get("rows", [])}
    previous.update({k: {"key": k, **v} for k, v in results.items()})
    order = [k for k in FAULTS if k in previous]
    save("faults", {
        "title": "Faults injected into a real 2-rank run: detection, loss, resume",
        "machine": machine(),
        "settings": {"ranks": 2, "backbone": "test_resnet", "steps_per_epoch": STEPS_PER_EPOCH, "epochs": 2,
                     "save_every": 3, "inject_after_steps": INJECT_AFTER_STEPS,
                     "comm_timeout_s": COMM_TIMEOUT, "launcher_grace_s": 30,
                     "baseline_straight_run_s": round(straight_s, 1), "baseline_step_s": round(step_s, 3)},
        "rows": [previous[k] for k in order],
        "notes": ["detected_s: injection to the first line naming the fault (SIGTERM: the line saying the run "
                  "stopped after its checkpoint); job_end_s: to the launcher's exit, whose 30 s grace before "
                  "SIGKILL dominates for a stopped rank",
                  "lost: training time between the newest complete checkpoint and the injection, in seconds and "
                  "in steps at the straight run's mean step time (evaluation included); --save-every bounds it",
                  "a bad image (corrupt file mid-epoch) follows the data module's policy; not injected here",
                  "exit: the launcher's exit code, that of the first rank it saw fail (4 hung rank, 5 write failure, "
                  "6 loader worker; 247 = a rank killed by signal 9; 1 = launch.py itself got SIGTERM, its ranks "
                  "exit 143 after saving)",
                  "lost node: the 4-rank run (2 launchers of 2 ranks, global batch 128) resumes on 2 ranks with the "
                  "global batch kept (accumulation 2): TA/RA of its final model beside straight 4-rank and 2-rank "
                  "runs; bit-exactness is promised only on the same number of ranks"]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
