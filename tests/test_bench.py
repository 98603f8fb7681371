"""The benchmarks' own machinery: the two-namespace link leaves nothing behind, the report renders
any results file of the common schema."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import netns  # noqa: E402

needs_netns = pytest.mark.skipif(netns.available() is not None, reason=f"netns: {netns.available()}")


def _veths(names):
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [n for n in names if f"tmp{n}" in out or f" {n}:" in out or f" {n}@" in out]


@needs_netns
def test_link_is_rate_limited_and_removed():
    with netns.Link(rate="100mbit") as link:
        assert set(link.ns) <= set(netns.namespaces())
        assert "rate 100Mbit" in link.qdisc(0) and "rate 100Mbit" in link.qdisc(1)
        proc = link.popen(1, [sys.executable, "-c", "import time; time.sleep(60)"])
        time.sleep(0.5)
        assert proc.poll() is None
    assert proc.poll() is not None               # processes inside are stopped
    assert not set(link.ns) & set(netns.namespaces())
    assert not _veths(link.ns)


PING = """
import socket, sys, time
if sys.argv[1] == "serve":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[2], 5001))
    s.listen(1)
    c = s.accept()[0]
    while c.recv(1):
        c.sendall(b"q")
else:
    for _ in range(100):
        try:
            c = socket.create_connection((sys.argv[2], 5001))
            break
        except OSError:
            time.sleep(0.1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(5):
        t = time.perf_counter()
        c.sendall(b"p")
        c.recv(1)
        rtts.append(time.perf_counter() - t)
    print(min(rtts))
"""


@needs_netns
def test_a_delayed_link_takes_its_round_trip_and_leaves_nothing():
    with netns.Link(rate="100mbit", delay="20ms") as link:
        assert "rate 100Mbit" in link.qdisc(0) and "rate 100Mbit" in link.qdisc(1)
        server = link.popen(1, [sys.executable, "-c", PING, "serve", link.addrs[1]])
        client = link.popen(0, [sys.executable, "-c", PING, "ping", link.addrs[1]], stdout=subprocess.PIPE, text=True)
        out = client.communicate(timeout=60)[0]
        server.wait(10)
        assert link.wire.packets > 10
    assert float(out) >= 0.040  # 20 ms each way (a lower bound: a busy machine only adds to it)
    assert not set(link.ns) & set(netns.namespaces()) and not _veths(link.ns)


@needs_netns
def test_stale_namespaces_of_dead_runs_are_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}a"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    mine = f"{netns.PREFIX}{os.getpid()}b"     # a live run's namespace stays
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        assert stale in netns.cleanup_stale()
        names = netns.namespaces()
        assert stale not in names and mine in names
    finally:
        subprocess.run(["ip", "netns", "del", mine], check=False)
        subprocess.run(["ip", "netns", "del", stale], check=False)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_link_benchmark_cleans_up_when_interrupted(sig, tmp_path):
    """Interrupt the real benchmark once its ranks run inside the namespaces: nothing may remain."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "link_bench.py"), "--backbone", "test_resnet",
                             "--steps", "1", "--epochs", "1", "--compressors", "none"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = [f"{netns.PREFIX}{proc.pid}a", f"{netns.PREFIX}{proc.pid}b"]
    deadline = time.monotonic() + 90
    inside = []
    while time.monotonic() < deadline and not inside:   # wait until the recipe's ranks run in namespace b
        if proc.poll() is not None:
            break
        if names[1] in netns.namespaces():
            pids = subprocess.run(["ip", "netns", "pids", names[1]], capture_output=True, text=True).stdout.split()
            if any("fashion_mnist_dat" in _cmdline(p) for p in pids):
                inside = pids
        time.sleep(0.2)
    assert inside, "the benchmark never started its ranks"
    proc.send_signal(sig)
    assert proc.wait(60) != 0
    assert not set(names) & set(netns.namespaces())
    assert not _veths(names)
    for pid in inside:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_report_renders_the_common_schema(tmp_path, monkeypatch):
    import report
    import report_common
    results, plots = tmp_path / "results", tmp_path / "plots"
    results.mkdir()
    (results / "semisup.json").write_text(json.dumps({
        "title": "Semi-supervised DAT", "machine": {"cpu": "x", "cores": 2, "gpu": "none"},
        "settings": {"epochs": 2}, "rows": [{"method": "a", "RA %": 40.0}, {"method": "b", "RA %": 41.5, "TA %": 80}],
        "curves": {"a": [[1, 0.3], [2, 0.4]]}, "notes": ["one seed"]}))
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report_common, "PLOTS", plots)
    monkeypatch.setattr(report, "REPORT", tmp_path / "REPORT.md")
    report.main()
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Semi-supervised DAT" in text and "| method | RA % | TA % |" in text and "| b | 41.5 | 80 |" in text
    assert "* one seed" in text and "No GPU was available" in text
    assert (plots / "semisup_curves.png").stat().st_size > 1000


def bench_imports(path: Path) -> set:
    """The bench modules ``path`` imports, at its top or inside its functions."""
    import ast
    mods = {p.stem for p in path.parent.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return (found & mods) - {path.stem}


def test_no_import_circle_among_the_benchmarks_even_inside_functions():
    """The report's sections import their shared helpers from report_common, never report.py."""
    from test_architecture import find_cycle
    graph = {p.stem: bench_imports(p) for p in (ROOT / "bench").glob("*.py")}
    assert {"report_faults", "report_loader"} <= graph["report"], "the graph was not read"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
