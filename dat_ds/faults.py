"""Faults a cluster really has, each ended with one line and its own exit code.

| exit | fault |
|---|---|
| 4 | a rank stopped answering: no step progress, or a collective timed out, within ``--comm-timeout`` |
| 5 | a checkpoint or log write failed (disk full, read-only file system, no permission) |
| 6 | a data-loader worker died (killed, out of memory) |

In every case the newest complete checkpoint stays in charge and ``--resume`` continues from it.
A rank ends with ``os._exit`` after flushing its line: a normal interpreter exit would tear down a
process group whose peer is gone, which can hang.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, List, Optional

from . import dist

EXIT_COMM = 4
EXIT_WRITE = 5
EXIT_LOADER = 6
RESUME_HINT = "the newest complete checkpoint is kept and --resume continues from it"
STORE_SILENT = "rank 0 stopped answering (the rendezvous store it hosts does not answer)"
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EDQUOT: "disk quota exceeded", errno.EIO: "input/output error"}


class Fault(RuntimeError):
    """A fault that ends the run with one line and ``code``."""
    code = 1


class CommTimeout(Fault):
    """A rank stopped answering (stopped process, frozen machine, dead link) or left the world."""
    code = EXIT_COMM


class WriteFailed(Fault):
    """A checkpoint or log file could not be written; the message names the path and the cause."""
    code = EXIT_WRITE

    @classmethod
    def from_os_error(cls, path, err: OSError) -> "WriteFailed":
        cause = WRITE_ERRNOS.get(err.errno) or err.strerror or type(err).__name__
        return cls(f"cannot write {path}: {cause}")


class LoaderWorkerDied(Fault):
    """A data-loader worker process died; torch's own error names its pid and the signal."""
    code = EXIT_LOADER


def classify(err: BaseException) -> Optional[Fault]:
    """The :class:`Fault` behind an exception raised by torch, or None for any other error."""
    if isinstance(err, Fault):
        return err
    text = str(err)
    worker = re.search(r"DataLoader worker \(pid(?:\(s\))? ([^)]*)\) "
                       r"(is killed by signal: [^.]+|exited unexpectedly)", text)
    if worker:
        return LoaderWorkerDied(f"data-loader worker (pid {worker.group(1).strip()}) {worker.group(2)}; {RESUME_HINT}")
    if not isinstance(err, RuntimeError):  # torch.distributed.DistBackendError is a RuntimeError
        return None
    if re.search(r"[Tt]imed out|[Tt]imeout", text) and re.search(r"gloo|recv|send|[Cc]ollective|NCCL|barrier", text):
        return CommTimeout("a collective timed out")
    if re.search(r"Connection (closed|reset) by peer|Broken pipe|[Cc]onnection refused", text):
        return CommTimeout("a peer rank left during a collective (it exited or its machine failed)")
    return None


def write_failed(path, err: BaseException) -> Fault:
    """``err`` from writing ``path`` as a :class:`WriteFailed` naming the cause.

    torch's archive writer reports a failed write as a bare RuntimeError; the OSError behind it
    (with its errno) is in the exception chain when the file was opened in Python. Failing
    that, a nearly full file system is named as the cause. Another fault that surfaced during
    the write (a loader worker's death is raised wherever the main thread happens to be) is
    returned as itself.
    """
    other = classify(err)
    if other is not None and not isinstance(other, WriteFailed):
        return other
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return WriteFailed.from_os_error(path, seen)
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(_existing_parent(path)).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return WriteFailed(f"cannot write {path}: {WRITE_ERRNOS[errno.ENOSPC]} ({free} bytes free)")
    lines = str(err).strip().splitlines()
    return WriteFailed(f"cannot write {path}: {lines[0] if lines else type(err).__name__}")


def _existing_parent(path) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


class Watchdog:
    """Ends this rank (exit 4) when training makes no step progress for ``timeout`` seconds.

    The process-group timeout bounds the collectives that have one; this covers the rest: a
    collective without a timeout of its own (DeepSpeed's CPU shared-memory all-reduce), or this
    rank stuck outside any collective. Call :meth:`beat` once per optimizer step, and wrap phases
    that legitimately run long without steps (evaluation, checkpoints: their collectives keep the
    process-group timeout) in :meth:`paused` (or pause the whole run and :meth:`watching` the loop).

    Each rank also bumps a heartbeat counter in the launcher's rendezvous store from a thread, so
    when the time is up the line can name the rank whose process stopped answering::

        with faults.Watchdog(cfg.comm_timeout) as watchdog, faults.exit_on_fault(watchdog):
            for batch in loader:
                ...
                watchdog.beat()
    """

    PREFIX = "dat_ds/heartbeat/"

    def __init__(self, timeout: float = dist.DEFAULT_COMM_TIMEOUT, interval: Optional[float] = None,
                 out=None):
        if not timeout > 0:
            raise ValueError(f"--comm-timeout must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self.interval = interval or min(2.0, max(0.5, self.timeout / 10))
        self.out = out or sys.stderr
        self.steps = 0
        self._last = time.monotonic()
        self._paused = 0
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._threads: List[threading.Thread] = []

    def __enter__(self) -> "Watchdog":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._last = time.monotonic()
        for target in (self._check, self._publish):
            t = threading.Thread(target=target, name=f"dat-ds-{target.__name__[1:]}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        """Step progress: restart the clock (cheap: no I/O, no lock)."""
        self.steps += 1
        self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """No step clock inside (evaluation, checkpoints); it restarts on the way out."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last = time.monotonic()

    @contextlib.contextmanager
    def watching(self):
        """The step clock runs inside, even within :meth:`paused` (a training loop inside a run
        that is otherwise paused)."""
        self._paused -= 1
        self._last = time.monotonic()
        try:
            yield
        finally:
            self._paused += 1

    def _check(self) -> None:
        while not self._stop.wait(min(1.0, self.interval)):
            if not self._paused and time.monotonic() - self._last > self.timeout:
                self.fail(f"no step progress for {self.timeout:g} s (--comm-timeout)")

    def _publish(self) -> None:
        """Bump this rank's heartbeat counter every ``interval`` (a stopped process stops bumping it)."""
        store = _store_client(timeout=max(30.0, self.timeout))
        if store is None:
            return
        key = f"{self.PREFIX}{dist.rank()}"
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # the store's host is gone or frozen: the checker will say so
                pass
            self._stop.wait(self.interval)

    def suspects(self) -> str:
        """Which rank stopped answering, as a phrase ('' when it cannot be known).

        Asked in a thread of its own with a deadline: a stopped store host can leave a store
        call waiting whatever its timeout says."""
        found: List[str] = []
        asker = threading.Thread(target=lambda: found.append(find_unresponsive(self.interval)), daemon=True)
        asker.start()
        asker.join(timeout=3 * self.interval + 10)
        if found:
            return found[0]
        return STORE_SILENT if dist.rank() != 0 else ""

    def fail(self, reason: str) -> None:
        """Print one line naming the reason and the unresponsive rank, flush, exit 4 (once)."""
        if not self._fired.acquire(blocking=False):
            time.sleep(3600)  # the other caller is already ending the process
        who = self.suspects()
        end_process(CommTimeout(f"{reason}{': ' + who if who else ''}; {RESUME_HINT}"), self.out)


def _store_client(timeout: float):
    """A client of the launcher's rendezvous store of its own (own socket), or None at world size 1."""
    address = dist.store_address()
    if address is None:
        return None
    import torch.distributed as tdist
    try:
        return tdist.TCPStore(address[0], address[1], is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
    except Exception:
        return None


def find_unresponsive(interval: float) -> str:
    """Name the ranks whose heartbeat stopped, by reading every counter twice, ``2.5 interval`` apart.

    Counters, not clocks, so machines' clock skew does not matter. When the store itself does not
    answer, its host (rank 0) is the one that stopped.
    """
    world, me = dist.world_size(), dist.rank()
    if world == 1:
        return ""
    store = _store_client(timeout=max(5.0, 3 * interval))
    keys = [f"{Watchdog.PREFIX}{r}" for r in range(world)]
    try:
        before = [store.add(k, 0) for k in keys]
        time.sleep(2.5 * interval)
        after = [store.add(k, 0) for k in keys]
    except Exception:
        return STORE_SILENT if me != 0 else ""
    silent = [r for r in range(world) if r != me and after[r] == before[r]]
    if not silent:
        return "every rank's process still answers (one is stuck outside a collective, or slower than the timeout)"
    return f"rank {', '.join(map(str, silent))} stopped answering (no heartbeat: a stopped process, a frozen " \
           f"machine or a dead link)"


def end_process(fault: Fault, out=None) -> None:
    """One line ``<prog>: error: rank R: <fault>`` on stderr, flushed, then ``os._exit(fault.code)``."""
    out = out or sys.stderr
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "dat-ds"
    where = f"rank {dist.rank()}: " if dist.world_size() > 1 else ""
    try:
        sys.stdout.flush()
        print(f"{prog}: error: {where}{fault}", file=out, flush=True)
    finally:
        os._exit(fault.code)


@contextlib.contextmanager
def exit_on_fault(watchdog: Optional[Watchdog] = None):
    """Turn the faults of :func:`classify` raised inside into one line and their exit code.

    A timed-out collective goes through ``watchdog.fail`` when given, so the line names the rank
    that stopped answering. Any other exception passes through unchanged.
    """
    try:
        yield
    except BaseException as err:
        fault = classify(err)
        if fault is None:
            raise
        if threading.current_thread() is threading.main_thread():
            # the launcher's SIGTERM to the survivors must not cut the line short (the run's own
            # handler is gone once the exception has left the training loop)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        if isinstance(fault, CommTimeout) and watchdog is not None:
            timed_out = "timed out" in str(fault)
            watchdog.fail(f"{fault} (--comm-timeout {watchdog.timeout:g} s)" if timed_out else str(fault))
        if isinstance(fault, CommTimeout) and RESUME_HINT not in str(fault):
            fault = CommTimeout(f"{fault}; {RESUME_HINT}")
        end_process(fault)


def agree(local_ok: bool, message: str = "") -> Optional[str]:
    """One collective: None when every rank succeeded, else the first failing rank's message
    (the same on every rank, so all of them take the same decision and none waits forever)."""
    results = dist.all_gather_object((bool(local_ok), message))
    for ok, msg in results:
        if not ok:
            return msg
    return None


def run_agreed(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank (a write; a no-op on some) and agree: when it failed on any rank,
    raise that rank's :class:`WriteFailed` on every rank; else return what ``fn`` returned."""
    result = None
    try:
        result = fn()
        problem = agree(True)
    except WriteFailed as err:
        problem = agree(False, str(err))
    if problem is not None:
        raise WriteFailed(problem)
    return result
