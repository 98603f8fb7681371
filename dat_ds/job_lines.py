"""Lines a job prints once, not once per rank.

Under a launcher every rank meets the same bad input (a misspelt flag, a missing file) and would
print the same line among the launcher's log lines. :func:`print_once` lets the ranks compare
notes through the launcher's rendezvous store (``MASTER_ADDR:MASTER_PORT``; rank 0 hosts it, or
torchrun's agent): each rank posts its line, and a rank prints it only when no lower rank posted
the same one. So a shared error is printed once, by the lowest rank that has it, and a line only
some ranks have (a file missing on one node) is still printed, as ``rank R: ...``. Ranks wait at
most :data:`WAIT` seconds for the lower ranks; a rank that cannot reach the store prints anyway.
torchrun's agent keeps one store for the whole job, so every round of workers (the first start and
each elastic restart) posts under a prefix of its own: a line of a round that failed earlier would
otherwise silence the same line of the next.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time

PREFIX = "dat_ds/line/"


def _prefix() -> str:
    """The keys of this round of workers: torchrun numbers its restarts (``TORCHELASTIC_RESTART_COUNT``)."""
    return f"{PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
WAIT = 5.0  # seconds a rank waits for the lower ranks' lines (they fail within a second or two of it)


def _rank_world() -> tuple:
    """``(rank, world size)`` from the launcher's environment (valid before the process group exists)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def print_once(head: str, body: str, before: str = "", file=None) -> None:
    """Print ``before`` (e.g. a usage line) and ``head + body`` once per job: rank 0, or the lowest
    rank whose ``body`` no lower rank has; ranks other than 0 say ``head + "rank R: " + body``."""
    file = file or sys.stderr
    rank, world = _rank_world()
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        _emit(file, before, head + body)
        return
    with _signals_held():
        store, hosting = _store(rank)
        if store is None:
            _emit(file, before, head + (f"rank {rank}: " if rank else "") + body)
            return
        shared = _post_and_compare(store, rank, body)
        if not shared:
            _emit(file, before, head + (f"rank {rank}: " if rank else "") + body)
        if hosting:
            _keep_store_up(store, world)


def _emit(file, before: str, line: str) -> None:
    sys.stdout.flush()
    print(f"{before}\n{line}" if before else line, file=file, flush=True)


def _post_and_compare(store, rank: int, body: str) -> bool:
    """Post this rank's line; True when a lower rank posted the same one (it prints it)."""
    prefix = _prefix()
    try:
        store.set(f"{prefix}{rank}", body)
        deadline = time.monotonic() + WAIT
        waiting = set(range(rank))
        while waiting:
            for r in sorted(waiting):
                if store.check([f"{prefix}{r}"]):
                    waiting.discard(r)
                    if store.get(f"{prefix}{r}").decode() == body:
                        return True
            if waiting and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return False
    except Exception:  # the store went away (its host exited): say it ourselves
        return False
    finally:
        with contextlib.suppress(Exception):
            store.add(f"{prefix}done", 1)


def _keep_store_up(store, world: int) -> None:
    """The store's host stays until every rank has compared its line (or :data:`WAIT` is over)."""
    deadline = time.monotonic() + WAIT + 1
    with contextlib.suppress(Exception):
        while time.monotonic() < deadline and store.add(f"{_prefix()}done", 0) < world:
            time.sleep(0.05)


def _store(rank: int) -> tuple:
    """``(client of the launcher's store, whether this process hosts it)``; before any process group,
    rank 0 hosts one on the launcher's port itself (torchrun's agent hosts its own). ``(None, False)``
    when none answers."""
    import torch.distributed as tdist
    host, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", 29500))
    timeout = datetime.timedelta(seconds=WAIT)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    grouped = tdist.is_available() and tdist.is_initialized()
    if rank == 0 and not agent and not grouped:
        with contextlib.suppress(Exception):
            return tdist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout), True
    with contextlib.suppress(Exception):
        return (tdist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timeout),
                rank == 0 and not agent)
    return None, False


@contextlib.contextmanager
def _signals_held():
    """The launcher's SIGTERM to the other ranks, once one rank exits, must not cut the line short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

