"""The used-by line as a new user runs it: ``deepspeed --hostfile hosts recipes/imagenet_dat.py`` on a
generated ImageFolder with a localhost hostfile, end to end to ``summary.json``."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clean_env
from dat_ds.dist import free_port
from test_data_images import add_bad_images, write_folder

LAUNCHER = str(Path(sys.executable).with_name("deepspeed"))


def run_group(cmd, env, timeout):
    """Run the launcher in its own process group; on a timeout its ranks end with it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow  # about a minute on 2 busy cores
def test_imagenet_recipe_with_a_localhost_hostfile(tmp_path):
    data = write_folder(tmp_path / "imagenet", classes=3, n_train=12, n_val=4, size=32)
    garbage = add_bad_images(data / "train")[1]  # a bad file on a real run: named, skipped, no rank hangs
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                                  "optimizer": {"type": "Lamb", "params": {"lr": 0.01}},
                                  "zero_optimization": {"stage": 0}}))
    out = tmp_path / "run"
    cmd = [LAUNCHER, "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "recipes/imagenet_dat.py", "--data-dir", str(data),
           "--backbone", "test_resnet", "--img-size", "32", "--deepspeed_config", str(config), "--epochs", "1",
           "--steps", "1", "--eval-steps", "1", "--num-workers", "0", "--eval-batch-size", "8",
           "--output-dir", str(out)]
    # the Makefile's op cache: a cache shared with other installs rebuilds DeepSpeed's op on every switch
    env = clean_env({"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                            str(Path(sys.prefix) / "torch_extensions"))})
    r = run_group(cmd, env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dataset"] == "imagefolder" and summary["eval_samples"] == 12
    assert 0 <= summary["robust_acc"] <= summary["clean_acc"] <= 1
    assert f"skipping unreadable image {garbage}" in r.stdout + r.stderr
