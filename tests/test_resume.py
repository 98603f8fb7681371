"""Crash and resume with the real launcher: a killed run, resumed, ends with the same weights as
one that ran straight through (bit for bit: fp32 on the CPU, 2 gloo ranks)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, clean_env, fill_disk, mounted_tmpfs, run_deepspeed, run_recipe
from dat_ds.dist import free_port
from dat_ds.engine import COMPLETE, complete_checkpoints

RECIPE = ROOT / "recipes" / "fashion_mnist_dat.py"
# 2 ranks x 32 = 64 per step: 10 steps per epoch, 2 epochs; a mid-epoch checkpoint every 3 steps
RUN = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "640", "--eval-limit", "32",
       "--steps", "2", "--eval-steps", "1", "--epochs", "2", "--save-every", "3",
       "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


def final_weights(out):
    tag = (out / "checkpoints" / "latest").read_text()
    return torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, first {diff[0]}"


def launch(args, num_ranks=2):
    """Start the deepspeed launcher in its own session; returns the Popen."""
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(num_ranks),
           "--master_port", str(free_port()), str(RECIPE), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_mid_epoch_checkpoint(proc, ckpt_dir, timeout=300):
    """Poll until a mid-epoch checkpoint is marked complete (not a sleep: the marker is the signal)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(ckpt_dir.glob(f"epoch0000-batch*/{COMPLETE}")):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared")


def ranks_of(proc):
    """The training processes under the launcher (deepspeed runner -> launch.py -> ranks)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    return [k for k in kids if any(str(RECIPE) in part for part in k.cmdline()) and "--local_rank" in " ".join(
        k.cmdline())]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    r = run_deepspeed(RECIPE, [*RUN, "--output-dir", out], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.slow  # a straight and a killed 2-rank run; the single-process kill resumes exactly in the fast suite
def test_sigkill_of_one_rank_mid_epoch_then_resume_equals_straight_run(tmp_path, straight):
    out = tmp_path / "killed"
    proc = launch([*RUN, "--output-dir", out])
    try:
        wait_for_mid_epoch_checkpoint(proc, out / "checkpoints")
        victims = ranks_of(proc)
        assert len(victims) == 2
        victims[-1].send_signal(signal.SIGKILL)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "the launcher tears the world down when a rank dies"
    assert not (out / "summary.json").exists(), "killed before the end: " + log[-2000:]
    r = run_deepspeed(RECIPE, [*RUN, "--output-dir", out, "--resume"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_weights(final_weights(straight), final_weights(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]


@pytest.mark.slow  # two 2-rank runs (~25 s); the SIGKILL case stays in the fast suite
def test_sigterm_to_the_launcher_saves_then_resume_equals_straight_run(tmp_path, straight):
    out = tmp_path / "terminated"
    proc = launch([*RUN, "--output-dir", out])
    try:
        wait_for_mid_epoch_checkpoint(proc, out / "checkpoints")
        launch_py = [k for k in psutil.Process(proc.pid).children(recursive=True)
                     if "deepspeed.launcher.launch" in " ".join(k.cmdline())]
        assert len(launch_py) == 1
        launch_py[0].send_signal(signal.SIGTERM)  # launch.py forwards it to every rank
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in log, log[-3000:]
    latest = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / latest / COMPLETE).is_file()
    assert not (out / "summary.json").exists()
    r = run_deepspeed(RECIPE, [*RUN, "--output-dir", out, "--resume"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_weights(final_weights(straight), final_weights(out))


ORACLE_RUN = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "640", "--eval-limit", "32",
              "--eval-steps", "1", "--save-every", "6", "--deepspeed_config",
              ROOT / "tests" / "configs" / "tiny_lamb.json"]


@pytest.mark.parametrize("oracle", [
    pytest.param(["--attack", "pgd", "--steps", "1", "--epochs", "2", "--defer-guard", "on"], id="pgd_deferred_guard"),
    pytest.param(["--attack", "conadv", "--tau", "2", "--epochs", "2"], id="conadv_tau2", marks=pytest.mark.slow),
    pytest.param(["--attack", "free", "--steps", "2", "--epochs", "4", "--compressor", "ef_sign"], id="free2_ef_sign",
                 marks=pytest.mark.slow)])
def test_single_process_kill_mid_epoch_resume_is_exact(tmp_path, oracle):
    """ConAdv's look-ahead batch and weight history, Free-m's perturbation and the error-feedback
    residual all come back from a mid-epoch checkpoint; so does a run whose step guard agrees on the
    device (its last agreement is settled before the checkpoint is taken)."""
    args = [*ORACLE_RUN, *oracle]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = run_recipe([*args, "--output-dir", ref])
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, str(RECIPE), *map(str, args), "--output-dir", str(out)], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_mid_epoch_checkpoint(proc, out / "checkpoints")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    newest = complete_checkpoints(out / "checkpoints")[0][1]  # `latest` may not have moved yet
    assert newest["position"][1] > 0, "resumes inside an epoch"
    r = run_recipe([*args, "--output-dir", out, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(ref), final_weights(out))


# --- which checkpoint --resume takes ---------------------------------------------------------

META = {"backbone": "test_resnet", "stem": "native", "dataset": "fashion_mnist", "num_classes": 10}


def fake_checkpoint(ckpt_dir, tag, position, complete=True, meta=META, world=2):
    """A tag folder as save_checkpoint leaves it (tiny tensors), with or without its marker."""
    d = ckpt_dir / tag
    d.mkdir(parents=True)
    files = {}
    for name in ("mp_rank_00_model_states.pt", "rank0.pt", "rank1.pt"):
        torch.save({"w": torch.arange(1000.0)}, d / name)
        files[name] = (d / name).stat().st_size
    if complete:
        (d / COMPLETE).write_text(json.dumps({"tag": tag, "position": position, "global_step": 0,
                                              "world_size": world, "meta": meta, "files": files}))
    return d


def pick(ckpt_dir, capsys, meta=META, world=2):
    from dat_ds.engine import pick_checkpoint
    picked = pick_checkpoint(ckpt_dir, meta, world)
    return (picked[0] if picked else None), capsys.readouterr().err


def test_resume_takes_the_newest_complete_checkpoint_by_position(tmp_path, capsys):
    fake_checkpoint(tmp_path, "epoch0000", [1, 0])
    fake_checkpoint(tmp_path, "epoch0001-batch000004", [1, 4])
    fake_checkpoint(tmp_path, "epoch0001-batch000008", [1, 8], complete=False)  # its save was cut short
    tag, err = pick(tmp_path, capsys)
    assert tag == "epoch0001-batch000004"
    assert "ignoring incomplete checkpoint" in err and "epoch0001-batch000008" in err


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_resume_falls_back_from_a_damaged_checkpoint_and_says_so(tmp_path, capsys, damage):
    fake_checkpoint(tmp_path, "epoch0000", [1, 0])
    d = fake_checkpoint(tmp_path, "epoch0001", [2, 0])
    f = d / "rank1.pt"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(raw[:len(raw) // 2])
    elif damage == "flip":  # same size, one byte of tensor data changed: the archive's checksum catches it
        i = raw.find(torch.arange(1000.0).numpy().tobytes()[4000:4008])
        raw[i] ^= 0xFF
        f.write_bytes(raw)
    else:
        f.unlink()
    tag, err = pick(tmp_path, capsys)
    assert tag == "epoch0000"
    assert f"checkpoint {d} is damaged" in err and "falling back to the previous complete checkpoint" in err


def test_resume_with_only_damaged_checkpoints_refuses(tmp_path, capsys):
    from dat_ds.engine import ConfigError
    d = fake_checkpoint(tmp_path, "epoch0000", [1, 0])
    (d / "rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        pick(tmp_path, capsys)


def test_resume_refuses_another_model_but_takes_another_world_size(tmp_path, capsys):
    from dat_ds.engine import ConfigError
    fake_checkpoint(tmp_path, "epoch0000", [1, 0])
    with pytest.raises(ConfigError, match="has backbone 'test_resnet', this run 'resnet18'"):
        pick(tmp_path, capsys, meta={**META, "backbone": "resnet18"})
    assert pick(tmp_path, capsys, world=4)[0] == "epoch0000"  # tests/test_elastic.py resumes such runs


def test_no_checkpoint_starts_afresh(tmp_path, capsys):
    assert pick(tmp_path / "none", capsys)[0] is None


def test_stop_signal_survives_a_forwarded_sigterm_but_not_a_second_ctrl_c():
    import os
    from dat_ds.guard import StopSignal
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher passing on what the process group got
        assert stop.signum == signal.SIGTERM
    with StopSignal() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# --- faults a cluster really has: a hung rank, a full disk, a dead loader worker ---------------

FAULT_SCRIPT = ROOT / "tests" / "scripts" / "fault_train.py"
LAUNCHER_GRACE = 30  # launch.py waits this long after SIGTERM before it SIGKILLs a rank


def launch_faulty(args):
    """``launch`` with the fault settings script (same training as the recipe)."""
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(FAULT_SCRIPT), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def fault_ranks(proc):
    kids = psutil.Process(proc.pid).children(recursive=True)
    return sorted((k for k in kids if str(FAULT_SCRIPT) in " ".join(k.cmdline()) and "--local_rank" in
                   " ".join(k.cmdline())), key=lambda k: " ".join(k.cmdline()))


def error_lines(log):
    return [line for line in log.splitlines() if ": error: " in line]


def resume_equals_straight(out, straight):
    r = run_deepspeed(RECIPE, [*RUN, "--output-dir", out, "--resume"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_weights(final_weights(straight), final_weights(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_timeout_then_resume_equals_straight_run(tmp_path, straight):
    """SIGSTOP rank 1 mid-epoch (a frozen process: alive, silent): rank 0 names it and exits 4 after
    --comm-timeout, the launcher ends the job after its grace period, and --resume continues."""
    out, timeout = tmp_path / "hung", 15
    proc = launch_faulty([*RUN, "--output-dir", out, "--comm-timeout", timeout])
    try:
        wait_for_mid_epoch_checkpoint(proc, out / "checkpoints")
        victim = fault_ranks(proc)[1]
        victim.suspend()
        t0 = time.monotonic()
        log = proc.communicate(timeout=timeout + LAUNCHER_GRACE + 90)[0]
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 4, log[-3000:]
    lines = error_lines(log)
    assert len(lines) == 1 and "rank 1 stopped answering" in lines[0], log[-3000:]
    assert "--comm-timeout" in lines[0] and "--resume continues" in lines[0]
    assert ended < timeout + LAUNCHER_GRACE + 30, f"the job ended {ended:.0f} s after the rank stopped"
    assert "Traceback" not in log, log[-3000:]
    resume_equals_straight(out, straight)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs for a run's outputs (the tests run as root); skipped where mounting is not permitted."""
    with mounted_tmpfs(tmp_path / "disk", "size=64m") as mnt:
        yield mnt


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 1])
def test_a_full_disk_ends_the_run_with_one_line_then_resume_equals_straight_run(small_disk, straight, retries):
    """The disk fills after a mid-epoch checkpoint: the next save fails on rank 0 (and rank 1's own
    file), every rank agrees, the previous checkpoint stays in charge, metrics.jsonl has no half
    line; with --save-retries 1 the run goes on once and the second failure in a row ends it."""
    out = small_disk / "run"
    proc = launch_faulty([*RUN, "--output-dir", out, "--save-retries", retries])
    try:
        wait_for_mid_epoch_checkpoint(proc, out / "checkpoints")
        filler = fill_disk(small_disk)
        log = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 5, log[-3000:]
    lines = error_lines(log)
    assert lines and all("cannot write" in line and "no space left on the device" in line for line in lines), \
        log[-3000:]
    assert {line.split("error: ")[1].split(": ", 1)[1] for line in lines} == {lines[0].split("error: ")[1].split(
        ": ", 1)[1]}, "every rank names the same path and cause"
    assert "Traceback" not in log, log[-3000:]
    assert ("training goes on" in log) == (retries > 0), log[-3000:]
    ckpts = out / "checkpoints"
    latest = (ckpts / "latest").read_text()
    assert (ckpts / latest / COMPLETE).is_file()
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        assert all(json.loads(line) for line in metrics.read_text().splitlines()), "whole lines only"
        assert metrics.read_text().endswith("\n") or metrics.read_text() == ""
    filler.unlink()
    resume_equals_straight(out, straight)


@pytest.mark.slow
def test_a_killed_loader_worker_ends_the_run_with_one_line_then_resume_works(tmp_path):
    """SIGKILL one data-loader worker of rank 0 mid-epoch: one line naming it, exit 6, and --resume
    finishes the run (with workers the batches are the same, the augmentation draws are not)."""
    out = tmp_path / "workers"
    args = [*RUN, "--num-workers", "1"]
    proc = launch_faulty([*args, "--output-dir", out])
    try:
        wait_for_mid_epoch_checkpoint(proc, out / "checkpoints")
        workers = []
        while not workers and proc.poll() is None:
            workers = [w for w in fault_ranks(proc)[0].children() if w.is_running()]
        assert workers, "rank 0 has no loader worker"
        workers[0].kill()
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 6, log[-3000:]
    lines = error_lines(log)
    # torch says "is killed by signal: Killed" or "exited unexpectedly", depending on where it notices
    assert any("rank 0: data-loader worker (pid" in line and ("killed by signal" in line or "exited unexpectedly" in
               line) for line in lines), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    r = run_deepspeed(RECIPE, [*args, "--output-dir", out, "--resume"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
