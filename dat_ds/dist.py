"""Process-group helpers that also work at world size 1 (a plain ``python recipe.py`` run).

Under the ``deepspeed`` launcher or ``torchrun`` RANK/WORLD_SIZE/MASTER_* are set; a single
process gets a one-rank world on a free loopback port so every code path (DeepSpeed included) is
the same. Under torchrun's elastic agent each round of workers (the first start and every
restart) forms its world on a store of its own (:func:`round_store`).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import secrets
import socket
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as tdist


def free_port() -> int:
    """A free TCP port on the loopback interface (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_COMM_TIMEOUT = 600.0  # seconds: DeepSpeed's own default, and far above any one collective
NCCL_GRACE = 30.0  # nccl's timeout aborts the process itself: it comes after dat-ds's watchdog has spoken


def init(timeout: Optional[float] = None) -> None:
    """Join the launcher's world, or make a one-rank world; idempotent.

    ``timeout`` (seconds, default :data:`DEFAULT_COMM_TIMEOUT`) bounds every collective: gloo
    raises in the waiting rank, nccl's asynchronous error handling aborts it. A rank that never
    reaches a collective is caught by :class:`dat_ds.faults.Watchdog` instead.
    """
    if tdist.is_available() and tdist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    seconds = DEFAULT_COMM_TIMEOUT if timeout is None else float(timeout)
    if not seconds > 0:
        raise ValueError(f"--comm-timeout must be > 0 seconds, got {timeout}")
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())
    backend = get_accelerator().communication_backend_name()
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective aborts
        seconds += NCCL_GRACE
    timeout = datetime.timedelta(seconds=seconds)
    store = round_store(timeout)
    if store is not None:  # DeepSpeed takes over a process group that exists
        tdist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                 world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    with _without_build_notice():
        deepspeed.init_distributed(verbose=False, timeout=timeout)
    _unlink_shm_buffer()


ROUND_KEY = "dat_ds/round"  # in torchrun's agent store: "PORT TOKEN" of the current round
TOKEN_KEY = "dat_ds/round_token"  # in rank 0's token server: the same TOKEN
CONNECT_S = 5.0  # seconds one try to reach an announced token server may take
_TOKEN_SERVER: list = []  # rank 0 keeps its round's token server for the life of the process


def round_store(timeout: datetime.timedelta):
    """The store of this round of workers under torchrun's elastic agent; None under another launcher.

    torchrun's c10d rendezvous keeps one store for every round (``TORCHELASTIC_USE_AGENT_STORE``),
    so a restarted group finds the previous round's keys there: gloo and nccl read the dead
    ranks' addresses and fail to connect (PyTorch issue 135712). Each round therefore works under
    a prefix of its own in the agent's store (which outlives every rank): a random token rank 0
    announces there, which the other ranks take once rank 0's token server answers with it (a
    stale announcement names a port of a process that is gone)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return None
    host = os.environ["MASTER_ADDR"]
    agent = tdist.TCPStore(host, int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return tdist.PrefixStore(f"dat_ds/round/{_round_token(agent, host, timeout)}/", agent)


def _round_token(agent, host: str, timeout: datetime.timedelta) -> str:
    if int(os.environ["RANK"]) == 0:
        token = secrets.token_hex(16)
        server = tdist.TCPStore(host, 0, int(os.environ["WORLD_SIZE"]), is_master=True, timeout=timeout,
                                wait_for_workers=False)
        server.set(TOKEN_KEY, token)
        _TOKEN_SERVER.append(server)
        agent.set(ROUND_KEY, f"{server.port} {token}")
        return token
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        port, token = agent.get(ROUND_KEY).decode().split()
        if _answers(host, int(port), token):
            return token
        time.sleep(0.2)
    raise TimeoutError(f"rank 0 announced no token of this round in {timeout.total_seconds():.0f} s")


def _answers(host: str, port: int, token: str) -> bool:
    """Whether a token server at ``host:port`` answers with ``token``."""
    try:  # a plain connect first: a gone process's port refuses at once, and quietly
        socket.create_connection((host, port), timeout=CONNECT_S).close()
        server = tdist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=CONNECT_S))
        return server.get(TOKEN_KEY).decode() == token
    except (OSError, RuntimeError):  # torch's DistError is a RuntimeError
        return False


@contextlib.contextmanager
def _without_build_notice():
    """DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully" on every CPU rank (even when the
    op was built long ago): noise before a recipe's own lines. Anything else it prints passes."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        rest = [line for line in captured.getvalue().splitlines(keepends=True)
                if not re.fullmatch(r"DeepSpeed \S+ built successfully\s*", line)]
        sys.stdout.write("".join(rest))


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    DeepSpeed maps one ~66 MB ``/dev/shm`` segment per local rank and never unlinks it, so every
    CPU run would leave them behind (and a machine's RAM fills up over many runs). Once every rank
    has mapped its peers' segments (the barrier), the names are no longer needed; the mappings
    stay valid until the processes exit, even after a SIGKILL.
    """
    if int(os.environ.get("LOCAL_SIZE", 0)) != world_size():
        return  # not all ranks on this machine: DeepSpeed made no segment
    tdist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def launcher_rank() -> int:
    """The rank a launcher gave this process (``RANK``), without joining its world; 0 without one.
    For jobs one process does (an export) when a launcher started several."""
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def synchronize() -> None:
    """Wait for the current stream's queued work, so wall-clock timers measure it (no-op on the CPU).

    Only the current stream: work on side streams (ConAdv's concurrent attack) keeps running.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def all_reduce_sum(values: Sequence[float], dev: torch.device = None) -> list:
    """Sum a few numbers over ranks (counts, timings) in one collective."""
    t = torch.tensor(list(values), dtype=torch.float64, device=dev or device())
    if world_size() > 1:
        tdist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (a few small Python objects, e.g. a status and a message)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def store_address() -> Optional[tuple]:
    """``(host, port)`` of the rendezvous store the launcher's world was formed on (rank 0 hosts it)."""
    if world_size() == 1 or "MASTER_ADDR" not in os.environ:
        return None
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
