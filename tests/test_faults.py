"""Faults a cluster really has, with real processes and real signals: a rank that stops answering,
a full or read-only disk, a failed checkpoint write on one rank only, a dying loader worker."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clean_env, fill_disk, mounted_tmpfs
from dat_ds import faults
from dat_ds.dist import free_port
from dat_ds.metrics import append_lines, write_text_atomic

SCRIPTS = ROOT / "tests" / "scripts"


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (the tests run as root); skipped where mounting is not permitted."""
    with mounted_tmpfs(tmp_path / "tmpfs", "size=1m") as mnt:
        yield mnt


def test_metrics_lines_are_whole_or_absent_on_a_full_disk(tmpfs):
    path = tmpfs / "metrics.jsonl"
    append_lines(path, [json.dumps({"epoch": 0, "loss": 1.0})])
    fill_disk(tmpfs)
    with pytest.raises(faults.WriteFailed, match=f"cannot write {path}: no space left on the device"):
        append_lines(path, [json.dumps({"epoch": 1, "pad": "x" * 20000})])
    assert path.read_text() == '{"epoch": 0, "loss": 1.0}\n', "the failed line was cut back, not left half-written"


def test_atomic_json_keeps_the_old_file_on_a_full_disk(tmpfs):
    path = tmpfs / "summary.json"
    write_text_atomic(path, "old\n")
    fill_disk(tmpfs)
    with pytest.raises(faults.WriteFailed, match="no space left"):
        write_text_atomic(path, "new" * 100000)
    assert path.read_text() == "old\n"
    assert not list(tmpfs.glob("*.tmp")), "the temporary file is removed"


def test_torch_save_failure_names_the_cause(tmpfs):
    """torch's archive writer raises a bare RuntimeError; the errno is found in its chain."""
    from dat_ds.checkpoint import _torch_save, _write_atomic
    fill_disk(tmpfs)
    target = tmpfs / "rank0.pt"
    with pytest.raises(faults.WriteFailed, match=f"cannot write {target}: no space left on the device"):
        _write_atomic(target, lambda tmp: _torch_save({"x": torch.zeros(100000)}, tmp))
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"], "no partial file is left behind"


def test_read_only_file_system_is_named(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        with pytest.raises(faults.WriteFailed, match="read-only file system"):
            append_lines(mnt / "metrics.jsonl", ["{}"])
        with pytest.raises(faults.WriteFailed, match="read-only file system"):
            write_text_atomic(mnt / "config.json", "{}")


@pytest.mark.parametrize("message, kind, code", [
    ("DataLoader worker (pid 4242) is killed by signal: Killed. ", faults.LoaderWorkerDied, 6),
    ("DataLoader worker (pid(s) 17, 18) exited unexpectedly", faults.LoaderWorkerDied, 6),
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation "
     "to complete", faults.CommTimeout, 4),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40915",
     faults.CommTimeout, 4),
])
def test_torch_errors_become_faults_with_their_exit_code(message, kind, code):
    fault = faults.classify(RuntimeError(message))
    assert isinstance(fault, kind) and fault.code == code
    assert faults.classify(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert faults.classify(ValueError("Timed out waiting for recv")) is None


def test_write_failed_names_errno_causes():
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")):
        err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        err.__context__ = OSError(code, os.strerror(code))
        assert words in str(faults.write_failed("/x/y.pt", err))
    # torch raises a loader worker's death wherever the main thread is, a checkpoint write included
    died = faults.write_failed("/x/y.pt", RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. "))
    assert isinstance(died, faults.LoaderWorkerDied)


def test_watchdog_ends_a_stalled_single_process_with_exit_4():
    code = ("import time\nfrom dat_ds import faults\n"
            "with faults.Watchdog(1.0) as w:\n"
            "    for _ in range(5):\n        time.sleep(0.1); w.beat()\n"
            "    with w.paused():\n        time.sleep(1.5)\n"  # a long evaluation does not count
            "    print('survived the pause', flush=True)\n    time.sleep(30)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == faults.EXIT_COMM, r.stderr[-2000:]
    assert "survived the pause" in r.stdout
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "no step progress for 1 s (--comm-timeout)" in lines[0], r.stderr[-2000:]
    assert time.monotonic() - t0 < 20


def launch(script, args):
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(script), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(path: Path, proc, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and path.read_text().strip():
            return path.read_text().split()
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.parametrize("stopped, factor", [pytest.param(1, 1.0, marks=pytest.mark.slow),
                                             pytest.param(0, 1.0, marks=pytest.mark.slow),
                                             pytest.param(1, 20.0, marks=pytest.mark.slow)],
                         ids=["rank1-watchdog", "rank0-store-host", "rank1-process-group-timeout"])
def test_a_stopped_rank_is_named_and_the_others_exit_4(tmp_path, stopped, factor):
    """SIGSTOP one of 2 ranks: the other names it within the timeout (plus the heartbeat check) and
    exits 4. ``factor`` 20 leaves the watchdog out, so the process-group timeout has to act."""
    timeout = 5
    proc = launch(SCRIPTS / "hang_ranks.py", ["--out", tmp_path, "--comm-timeout", timeout,
                                              "--watchdog-factor", factor])
    victim = None
    try:
        wait_for(tmp_path / "rank0.step", proc)
        victim = int(wait_for(tmp_path / f"rank{stopped}.step", proc)[0])
        time.sleep(0.5)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        lines = []
        while not lines and time.monotonic() - t0 < 60:
            line = proc.stdout.readline()
            lines = [line] if "error:" in line else []
        detected = time.monotonic() - t0
        os.kill(victim, signal.SIGCONT)  # the launcher's SIGTERM then ends it at once, not after 30 s
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert lines, log[-3000:]
    assert f"rank {stopped} stopped answering" in lines[0], lines[0]
    assert "--resume continues" in lines[0]
    assert proc.returncode == faults.EXIT_COMM, log[-3000:]
    interval = min(2.0, max(0.5, timeout * factor / 10))
    assert detected < timeout + 3 * interval + 15, f"detected after {detected:.1f} s"  # + the heartbeat check
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("how", ["--fail-rank", pytest.param("--fill", marks=pytest.mark.slow)])
def test_a_failed_save_on_any_rank_keeps_the_previous_checkpoint_on_every_rank(tmp_path, tmpfs, how):
    """Rank 1 alone failing to write (injected ENOSPC), or a real full disk under rank 0's model
    file: both ranks get the same one-line error, ``latest`` and the previous checkpoint stay, the
    unfinished one is removed, and a retried save is allowed to fail once."""
    from conftest import run_deepspeed
    args = ["--ckpt", tmpfs, "--out", tmp_path / "out"] + (["--fail-rank", "1"] if how == "--fail-rank" else ["--fill"])
    r = run_deepspeed(SCRIPTS / "save_faults.py", args, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = [json.loads((tmp_path / "out" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert seen[0] == seen[1], "every rank took the same decision"
    assert "no space left on the device" in seen[0]["bad"] and "cannot write" in seen[0]["bad"]
    assert seen[0]["again"] is False, "one retry was allowed: the run goes on"
    assert seen[0]["latest"] == "good" and seen[0]["tags"] == ["good"]
    assert seen[0]["dirs"] == ["good"], "the unfinished checkpoints were removed"
