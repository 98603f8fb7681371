"""Two network namespaces joined by a rate-limited veth pair: a two-machine link on one machine.

    with Link(rate="1gbit") as link:          # root only; torn down on exit, SIGINT, SIGTERM
        link.popen(0, ["python", "x.py"])     # runs inside namespace 0, its own process group
        print(link.addrs)                     # ["10.a.b.1", "10.a.b.2"]

Every name carries this process's pid (``datb<pid>a``, ``datb<pid>b``, for the namespaces and
the veth ends alike), and the private subnet is derived from it, so parallel runs do not
collide. ``cleanup_stale()`` removes namespaces of this prefix whose pid is no longer alive
(left by a run killed with SIGKILL). Both veth ends shape their egress with a token bucket
(``tc qdisc ... tbf rate 1gbit``), so the link is rate-limited in both directions.

``delay`` (e.g. ``"20ms"`` each way, a 40 ms round trip) needs a delay line, and this kernel has
no ``sch_netem`` (``tc ... netem`` says "Specified qdisc kind is unknown"; of the classful and
shaping qdiscs only ``tbf`` and ``htb`` are built in). The link is then two TUN devices, one per
namespace, each still shaped by ``tbf``, joined by :class:`DelayWire`: a thread of this process
that writes every packet read from one device into the other ``delay`` later. The devices use a
9000-byte MTU (jumbo frames), so 100 Mbit/s is ~1,400 packets/s each way for the wire.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import heapq
import json
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import threading
import time
from typing import List, Optional

PREFIX = "datb"
_NAME = re.compile(rf"^{PREFIX}(\d+)([ab])$")


def available() -> Optional[str]:
    """None when namespaces can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns / tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return _probe()


@functools.lru_cache(maxsize=None)
def _probe() -> Optional[str]:
    """Root is not enough in a container without CAP_NET_ADMIN or without the tbf qdisc: try both once."""
    name = f"datbprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
        shaped = subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit",
                                 "burst", "32kb", "latency", "10ms"], capture_output=True, text=True)
        if shaped.returncode != 0:
            return f"cannot shape a link with tc tbf: {shaped.stderr.strip() or shaped.returncode}"
        return None
    finally:
        _ip("netns", "del", name, check=False)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def namespaces() -> List[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ours(names: Optional[List[str]] = None) -> List[str]:
    """Namespaces of this prefix (any run's)."""
    return [n for n in (namespaces() if names is None else names) if _NAME.match(n)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> List[str]:
    """Delete this prefix's namespaces whose creating process is gone; returns their names."""
    removed = []
    for name in ours():
        pid = int(_NAME.match(name).group(1))
        if pid != os.getpid() and not _alive(pid):
            _kill_inside(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_inside(ns: str) -> None:
    """SIGKILL what still runs inside ``ns`` (only processes this benchmark started live there)."""
    out = _ip("netns", "pids", ns, check=False).stdout
    for pid in (int(p) for p in out.split() if p.isdigit()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
WIRE_MTU = 9000


def seconds(text: str) -> float:
    """``"20ms"`` / ``"0.5s"`` / ``"300us"`` as seconds."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(us|ms|s)?\s*", text)
    if not m:
        raise ValueError(f"not a delay: {text!r} (e.g. 20ms)")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[m.group(2)]


def open_tun(name: str) -> int:
    """A new TUN device ``name`` (layer 3, no packet information header); returns its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class DelayWire:
    """Two TUN devices joined in user space: a packet read from one is written to the other
    ``delay_s`` seconds after it was read (one thread, a heap of due packets). The kernel's queues
    and ``tbf`` sit before the wire, so the wire adds delay only."""

    def __init__(self, fds: List[int], delay_s: float):
        self.fds, self.delay_s = fds, delay_s
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-wire", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for k, fd in enumerate(self.fds):
            sel.register(fd, selectors.EVENT_READ, self.fds[1 - k])
        due: list = []  # (time to write, sequence, fd to write to, packet)
        seq = 0
        while not self._stop.is_set():
            wait = min(0.05, max(0.0, due[0][0] - time.monotonic())) if due else 0.05
            for key, _ in sel.select(wait):
                while True:
                    try:
                        packet = os.read(key.fd, 65536)
                    except (BlockingIOError, OSError):
                        break
                    seq += 1
                    heapq.heappush(due, (time.monotonic() + self.delay_s, seq, key.data, packet))
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, fd, packet = heapq.heappop(due)
                try:
                    os.write(fd, packet)
                    self.packets += 1
                except OSError:  # the receiving stack's queue is full: dropped, as a wire drops it
                    pass
        sel.close()


class Link:
    """Namespaces ``datb<pid>a`` / ``datb<pid>b``, addresses ``10.X.Y.1`` / ``10.X.Y.2``."""

    def __init__(self, rate: Optional[str] = "1gbit", burst: str = "256kb", latency: str = "20ms",
                 delay: Optional[str] = None):
        pid = os.getpid()
        self.ns = [f"{PREFIX}{pid}a", f"{PREFIX}{pid}b"]
        self.dev = list(self.ns)  # veth end k lives in namespace k under the same name (<= 15 chars)
        subnet = f"10.{200 + (pid >> 8) % 50}.{pid % 256}"
        self.addrs = [f"{subnet}.1", f"{subnet}.2"]
        self.rate, self.burst, self.latency, self.delay = rate, burst, latency, delay
        self.procs: List[subprocess.Popen] = []
        self.wire: Optional[DelayWire] = None
        self._up = False
        self._old_handlers = {}

    # --- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Link":
        cleanup_stale()
        atexit.register(self.down)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        self.down()
        raise KeyboardInterrupt(f"signal {signum}") if signum == signal.SIGINT else SystemExit(128 + signum)

    def up(self) -> None:
        self._up = True
        a, b = self.ns
        for ns in self.ns:
            _ip("netns", "add", ns)
        fds = []
        if self.delay:  # two TUN devices and a delay line between them (no sch_netem here)
            fds = [open_tun("tmp" + ns) for ns in self.ns]
            self.wire = DelayWire(fds, seconds(self.delay))
        else:
            _ip("link", "add", "tmp" + a, "type", "veth", "peer", "name", "tmp" + b)
        for k, ns in enumerate(self.ns):
            _ip("link", "set", "tmp" + ns, "netns", ns)
            _ip("-n", ns, "link", "set", "tmp" + ns, "name", self.dev[k])
            _ip("-n", ns, "addr", "add", f"{self.addrs[k]}/24", "dev", self.dev[k])
            if self.delay:
                _ip("-n", ns, "link", "set", self.dev[k], "mtu", str(WIRE_MTU))
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", self.dev[k], "up")
            if self.rate:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", self.dev[k], "root", "tbf",
                                "rate", self.rate, "burst", self.burst, "latency", self.latency],
                               check=True, capture_output=True, text=True)
        if self.wire is not None:
            self.wire.start()

    def down(self) -> None:
        """Stop every process started in the namespaces, then delete them (idempotent)."""
        for proc in self.procs:
            _stop(proc)
        self.procs = []
        if not self._up:
            return
        for ns in self.ns:
            _kill_inside(ns)
            _ip("netns", "del", ns, check=False)
        if self.wire is not None:
            self.wire.stop()  # closing the fds removes the TUN devices
            self.wire = None
        _ip("link", "del", "tmp" + self.ns[0], check=False)  # a pair that never reached its namespace
        self._up = False

    # --- use ----------------------------------------------------------------------------------
    def popen(self, k: int, cmd: List[str], env: Optional[dict] = None, **kw) -> subprocess.Popen:
        """Start ``cmd`` inside namespace ``k`` in a new session (its own process group)."""
        env = dict(os.environ if env is None else env)
        env["GLOO_SOCKET_IFNAME"] = self.dev[k]  # gloo would otherwise pick the host name's address
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[k], *cmd], env=env, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def tx_bytes(self, k: int) -> int:
        """Bytes sent so far from namespace ``k`` over the veth."""
        out = _ip("-n", self.ns[k], "-s", "-j", "link", "show", "dev", self.dev[k]).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def qdisc(self, k: int) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns[k], "tc", "qdisc", "show", "dev", self.dev[k]],
                              capture_output=True, text=True).stdout.strip()


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with its own session), SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_all(procs: List[subprocess.Popen], timeout: float) -> List[int]:
    """Wait for every process; on timeout or when one fails, stop the others. Returns exit codes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            time.sleep(2.0)  # give the peer a moment to report its own error
            break
        time.sleep(0.2)
    for p in procs:
        _stop(p)
    return [p.returncode if p.returncode is not None else -9 for p in procs]
