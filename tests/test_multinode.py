"""Multi-node launch for real: two launcher invocations (``--no_ssh --node_rank``) over loopback
form one 2-rank world, and the documented hostfile path starts a local world."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clean_env
from dat_ds.dist import free_port

SCRIPT = ROOT / "tests" / "scripts" / "dist_train.py"
LAUNCHER = str(Path(sys.executable).with_name("deepspeed"))


def load(out, rank):
    return torch.load(out / f"params_rank{rank}.pt", weights_only=True)


def test_two_launchers_with_no_ssh_form_one_world(tmp_path):
    """Node 0 and node 1 each start one rank; the world has 2 ranks that train in lockstep."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = [subprocess.Popen([LAUNCHER, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), str(SCRIPT),
                               "--out", str(tmp_path), "--micro", "16", "--steps", "3"],
                              cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    a, b = load(tmp_path, 0), load(tmp_path, 1)
    assert a["world"] == 2 and b["world"] == 2 and a["steps"] == 3
    assert torch.equal(a["params"], b["params"]) and not torch.equal(a["params"], a["init"])


@pytest.mark.slow  # test_two_launchers_with_no_ssh_form_one_world covers --no_ssh in the fast suite
def test_localhost_hostfile_without_ssh_check(tmp_path):
    """The README's single-machine hostfile: ``--hostfile`` + ``--no_ssh_check --master_addr 127.0.0.1``."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    r = subprocess.run([LAUNCHER, "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), str(SCRIPT), "--out", str(tmp_path), "--micro", "16",
                        "--steps", "2"], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = load(tmp_path, 0), load(tmp_path, 1)
    assert a["world"] == 2 and torch.equal(a["params"], b["params"])
