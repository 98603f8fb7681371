"""The used-by line as a new user runs it: ``deepspeed --hostfile hosts recipes/imagenet_dat.py`` on a
generated ImageFolder with a localhost hostfile, end to end to ``summary.json``."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import clean_env, run_group, run_recipe
from dat_ds.checkpoint_io import load_model
from dat_ds.dist import free_port
from test_data_images import add_bad_images, write_folder, write_jpeg

LAUNCHER = str(Path(sys.executable).with_name("deepspeed"))


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


def final_weights(out):
    tag = (out / "checkpoints" / "latest").read_text()
    return torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


@pytest.mark.slow  # two runs (~40-80 s on 2 busy cores); the loader's part is in test_data_images.py
def test_an_imagefolder_run_resumed_inside_an_epoch_ends_as_the_straight_run(tmp_path):
    """Training from JPEG files with the shipped decoder (the crop drawn before a scaled decode),
    chosen by its flag: stopped after step 4 of epoch 1's 6 and resumed, it ends with the straight
    run's weights, and the checkpoint records the decoder."""
    data = write_folder(tmp_path / "data", classes=3, n_train=7, n_val=2, size=40)
    for c in range(3):
        write_jpeg(data / "train" / f"class{c}" / "big.jpg", 200 + 30 * c, 180)  # decoded reduced at 16 px
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
                                  "optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}))
    args = ["--dataset", "imagefolder", "--data-dir", data, "--img-size", "16", "--backbone", "test_resnet",
            "--stem", "native", "--epochs", "2", "--save-every", "4", "--steps", "1", "--eval-steps", "1",
            "--decoder", "simplejpeg", "--deepspeed_config", config]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run_recipe([*args, "--output-dir", straight])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((straight / "summary.json").read_text())["dataset"] == "imagefolder"
    _, meta = load_model(straight / "checkpoints" / "epoch0001" / "mp_rank_00_model_states.pt")
    assert meta["dataset_settings"] == {"decoder": "simplejpeg"}  # an evaluation reads the files as trained
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "epoch0001")
    r = run_recipe([*args, "--output-dir", resumed, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1, batch 4" in r.stdout, r.stdout[-2000:]
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
