"""Two "nodes" on a 1 Gbit/s link: DAT step time per gradient compressor, against fp32 all-reduce.

The benchmark builds two network namespaces joined by a veth pair whose both ends are shaped
to ``--rate`` with ``tc ... tbf`` (the DAT paper's 1 Gbps Ethernet), checks the link with a
raw gloo transfer, then runs the real recipe (``recipes/fashion_mnist_dat.py``) once per
compressor as a two-node DeepSpeed job: one ``deepspeed --no_ssh --node_rank K`` launcher in
each namespace, one rank each. Per compressor: time per step and per epoch, bytes sent per
rank (the compressor's count and the veth's own counter), the computation/communication split
from the run's ``metrics.jsonl``, and the speedup over fp32. Namespaces are removed on exit,
on SIGINT/SIGTERM and at the next start after a crash. Needs root; without it the script
writes a results file that says so and exits 0.

    sudo python bench/link_bench.py                       # timm resnet18, 2 nodes x 1 rank, 1 Gbit/s
    sudo python bench/link_bench.py --steps 4 --compressors none qsgd8 --scenarios comm-heavy

Two scenarios, each with every compressor: ``dat`` (the attack and micro batch given, DAT-FGSM
at 16 by default) and ``comm-heavy`` (natural training at micro batch 4, where the fp32
exchange is most of the step). Per row also the ideal speedup (communication time taken as
zero) and the share of it a compressor reaches.

A slow link between the places data lives: ``--delay 20ms`` adds 20 ms each way (a 40 ms round
trip, through :class:`netns.DelayWire`, since this kernel has no ``netem``), and ``--add`` puts
the rows beside those of the links already in ``bench/results/NAME.json`` (each row names its
link; a link's rows are replaced when it is measured again):

    sudo python bench/link_bench.py --rate 100mbit --delay 20ms --scenarios dat --add --probe-mb 25
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import netns  # noqa: E402
from common import machine, save  # noqa: E402

# name -> recipe flags
COMPRESSORS = {
    "none": ["--compressor", "none"],
    "qsgd8": ["--compressor", "qsgd", "--bits", "8"],
    "qsgd4": ["--compressor", "qsgd", "--bits", "4"],
    "qsgd2": ["--compressor", "qsgd", "--bits", "2"],
    "sign_vote": ["--compressor", "sign_vote"],
    "ef_sign": ["--compressor", "ef_sign"],
    "powersgd": ["--compressor", "powersgd"],
    "bf16": ["--compressor", "bf16"],
}
LABELS = {"none": "fp32 all-reduce", "qsgd8": "QSGD 8-bit", "qsgd4": "QSGD 4-bit", "qsgd2": "QSGD 2-bit",
          "sign_vote": "sign_vote (1-bit)", "ef_sign": "ef_sign (1-bit + EF)", "powersgd": "PowerSGD rank 1",
          "bf16": "bf16 all-reduce"}
# name -> (training attack, extra recipe flags, micro batch per rank): today's DAT row, and a
# communication-heavy one (natural training at a small micro batch: little compute per byte sent)
SCENARIOS = {"dat": ("fgsm_rs", [], 16), "comm-heavy": ("none", [], 4)}
PROBE_MB = 100


def probe(rank: int, addr: str, port: int, mb: int = PROBE_MB) -> None:
    """Inside a namespace: time a raw ``mb`` MB gloo send and all_reduce across the link."""
    import torch
    import torch.distributed as tdist
    tdist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=2)
    x = torch.ones(mb * 250_000)  # fp32
    tdist.barrier()
    results = {}
    for name, fn in (("send", lambda: tdist.send(x, 1) if rank == 0 else tdist.recv(x, 0)),
                     ("all_reduce", lambda: tdist.all_reduce(x))):
        fn()  # warm-up: connection set-up, tbf bucket
        tdist.barrier()
        t0 = time.perf_counter()
        fn()
        tdist.barrier()
        results[name] = time.perf_counter() - t0
    if rank == 0:
        # send: the whole buffer crosses once; ring all_reduce on 2 ranks: each sends half twice
        gbit = 8 * x.numel() * 4 / 1e9
        print("PROBE " + json.dumps({"mb": mb, "send_s": results["send"], "send_gbit_s": gbit / results["send"],
                                     "all_reduce_s": results["all_reduce"],
                                     "all_reduce_gbit_s": gbit / results["all_reduce"]}), flush=True)
    tdist.destroy_process_group()


def run_probe(link: netns.Link, port: int, timeout: float, mb: int = PROBE_MB) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-rank", "{k}", "--probe-addr", link.addrs[0],
           "--probe-port", str(port), "--probe-mb", str(mb)]
    with tempfile.TemporaryFile("w+") as out:
        procs = [link.popen(k, [c.format(k=k) for c in cmd], stdout=out if k == 0 else None) for k in (0, 1)]
        codes = netns.wait_all(procs, timeout)
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("PROBE ")]
    if codes != [0, 0] or not lines:
        raise RuntimeError(f"link probe failed (exit codes {codes})")
    return json.loads(lines[-1][len("PROBE "):])


def run_recipe(link: netns.Link, name: str, args, port: int, workdir: Path, scenario: str = "dat") -> dict:
    """One two-node DeepSpeed job; returns its last epoch's figures."""
    hostfile = workdir / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    attack, attack_flags, micro = SCENARIOS[scenario]
    if scenario == "dat":
        attack, attack_flags, micro = args.attack, args.attack_flags, args.micro_batch
    out_dir = workdir / f"{scenario}_{name}"
    (workdir / f"ds_config_{micro}.json").write_text(json.dumps(ds_config(args, micro)))
    steps_per_epoch = args.steps
    cmd_tail = ["recipes/fashion_mnist_dat.py", "--deepspeed_config", str(workdir / f"ds_config_{micro}.json"),
                "--backbone", args.backbone, "--attack", attack, "--eps", "0.1", *attack_flags,
                "--train-limit", str(2 * micro * steps_per_epoch), "--eval-limit", "64",
                "--eval-steps", "1", "--holdout", "0", "--epochs", str(args.epochs), "--output-dir", str(out_dir),
                *COMPRESSORS[name]]
    procs = []
    tx0 = [link.tx_bytes(k) for k in (0, 1)]
    t0 = time.perf_counter()
    for k in (1, 0):
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--no_ssh", "--node_rank", str(k),
               "--num_nodes", "2", "--num_gpus", "1", "--hostfile", str(hostfile), "--master_addr", link.addrs[0],
               "--master_port", str(port), *cmd_tail]
        log = open(workdir / f"{scenario}_{name}.node{k}.log", "w")
        procs.append(link.popen(k, cmd, stdout=log, stderr=log, cwd=str(ROOT)))
    codes = netns.wait_all(procs, args.timeout)
    wall = time.perf_counter() - t0
    if codes != [0, 0]:
        tail = (workdir / f"{scenario}_{name}.node0.log").read_text()[-3000:]
        raise RuntimeError(f"{name}: two-node run failed (exit codes {codes}); node 0 log ends:\n{tail}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    steps = last["global_step"] - (rows[-2]["global_step"] if len(rows) > 1 else 0)
    train_s = last["compute_s"] + last["comm_s"]
    return {"scenario": scenario, "micro_batch": micro, "attack": attack,
            "compressor": name, "label": LABELS[name], "steps_per_epoch": steps,
            "step_s": train_s / steps, "train_s_per_epoch": train_s, "epoch_s": last["epoch_s"],
            "compute_s": last["compute_s"], "comm_s": last["comm_s"], "codec_s": last["codec_s"],
            "comm_share": last["comm_s"] / train_s, "bytes_per_rank": last["bytes_sent_per_rank"],
            "veth_tx_bytes_per_node": [(link.tx_bytes(k) - tx0[k]) for k in (0, 1)], "job_wall_s": wall}


def ds_config(args, micro: int) -> dict:
    cfg = json.loads((ROOT / "ds_configs" / "lamb_fp32.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = 1
    return cfg


def link_label(rate: str, delay=None) -> str:
    """``1gbit`` -> ``1 Gbit/s``; with a delay each way, the round trip it makes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg])bit", rate.lower())
    label = f"{m.group(1)} {m.group(2).upper()}bit/s" if m else rate
    return label + (f", {2 * netns.seconds(delay) * 1e3:g} ms RTT" if delay else "")


def rate_bits(rate: str) -> float:
    """``100mbit`` -> 1e8 bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg])bit", rate.lower())
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] if m else float("nan")


def summarize(results: list, probe_result: dict, rate: str, link: str = ""):
    """Table rows and notes from the per-compressor figures (speedups against fp32)."""
    notes = []
    rows = []
    for r in results:
        base = next((b for b in results if b["compressor"] == "none" and b["scenario"] == r["scenario"]), None)
        # ideal: the fp32 step with its communication time taken as zero (its compute only)
        ideal = base["compute_s"] / base["steps_per_epoch"] if base else None
        saved = (base["step_s"] - r["step_s"]) / (base["step_s"] - ideal) if base and base["step_s"] > ideal else None
        rows.append({"link": link or link_label(rate),
                     "scenario": f"{r['scenario']} ({r['attack']}, micro {r['micro_batch']})",
                     "compressor": r["label"], "s/step": r["step_s"], "s/epoch (train)": r["train_s_per_epoch"],
                     "epoch incl. eval s": r["epoch_s"], "compute s": r["compute_s"], "comm s": r["comm_s"],
                     "codec s": r["codec_s"], "comm share": f"{100 * r['comm_share']:.0f}%",
                     "MB/rank/epoch": r["bytes_per_rank"] / 1e6,
                     "veth MB/node": sum(r["veth_tx_bytes_per_node"]) / 2e6,
                     "speedup vs fp32": f"{base['step_s'] / r['step_s']:.2f}x" if base else "-",
                     "comm speedup": f"{base['comm_s'] / r['comm_s']:.1f}x" if base and r["comm_s"] > 0 else "-",
                     "ideal speedup": f"{base['step_s'] / ideal:.2f}x" if base else "-",
                     "share of ideal": f"{100 * saved:.0f}%" if saved is not None else "-"})
    notes.append(f"link check ({link or link_label(rate)}): a raw {probe_result['mb']} MB gloo send across the "
                 f"namespaces ran at "
                 f"{probe_result['send_gbit_s']:.3f} Gbit/s, an all_reduce at {probe_result['all_reduce_gbit_s']:.3f} "
                 f"Gbit/s of buffer (tbf rate {rate} on each end of the link)")
    notes.append("ideal speedup: the fp32 step over the same step with its communication time taken as zero "
                 "(fp32 compute only); share of ideal: the part of that removable time a compressor saves, "
                 "(fp32 s/step - s/step) / (fp32 s/step - ideal s/step); 100% = as if communication were free")
    notes.append("compute s includes the compressor's encode/decode (codec s); comm s is the time inside the "
                 "collectives, which also absorbs waiting for the slower node")
    notes.append("both 'nodes' share this machine's CPU cores (one rank each, OMP_NUM_THREADS=1): compute is "
                 "that of one core per node; only the link between them is a real network path")
    notes.append("figures are from the last epoch; s/step = (compute + comm) / steps; 'veth MB/node' is the "
                 "interface's own tx counter over the whole job (every epoch, the initial weight broadcast, "
                 "TCP/IP headers)")
    return rows, notes


def links_line(links: dict) -> str:
    """The settings of the links added to a results file, one phrase each."""
    return "; ".join(f"{label}: rate {v['settings']['rate']}, delay {v['settings']['delay']} each way, "
                     f"{'/'.join(v['settings']['scenarios'])} with {' '.join(v['settings']['compressors'])}, "
                     f"{v['settings']['steps']} steps x {v['settings']['epochs']} epochs, "
                     f"measured {v['machine'].get('date')}" for label, v in links.items())


def merged(name: str, payload: dict, label: str) -> dict:
    """``payload`` (one link's rows) beside the other links' rows of ``bench/results/NAME.json``."""
    path = ROOT / "bench" / "results" / f"{name}.json"
    if not path.exists():
        return payload
    old = json.loads(path.read_text())
    first = link_label(old.get("settings", {}).get("rate", "?"))  # files written before rows named their link
    rows = [{"link": first, **r} for r in old.get("rows", [])]
    raw = [{"link": first, **r} for r in old.get("raw", [])]
    keep = [r for r in rows if r["link"] != label]
    out = dict(old)
    out["rows"] = keep + payload["rows"]
    out["raw"] = [r for r in raw if r["link"] != label] + payload["raw"]
    out["notes"] = [n for n in old.get("notes", []) if not n.startswith(f"[{label}]")] + \
        [f"[{label}] {n}" for n in payload["notes"]]
    links = {k: v for k, v in old.get("links", {}).items() if k != label}
    links[label] = {"settings": payload["settings"], "machine": payload["machine"], "probe": payload["probe"],
                    "link": payload["link"]}
    out["links"] = links
    out["settings"] = {**old.get("settings", {}), "added links": links_line(links)}
    out["title"] = "Two nodes on a shaped link: DAT step time per compressor"
    out["bars"] = {**{k: v for k, v in old.get("bars", {}).items() if not k.endswith(f", {label}")},
                   **{f"{k}, {label}": v for k, v in payload["bars"].items()}}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="1gbit", help="tc tbf rate of each end of the link")
    p.add_argument("--delay", default=None, help="one-way delay added on each end, e.g. 20ms (a 40 ms round trip)")
    p.add_argument("--backbone", default="resnet18", help="timm name (resnet18: 11.2 M parameters at 10 classes)")
    p.add_argument("--attack", default="fgsm_rs", help="training attack of the recipe (fgsm_rs: DAT-FGSM)")
    p.add_argument("--micro-batch", type=int, default=16, help="per rank")
    p.add_argument("--steps", type=int, default=4, help="updates per epoch")
    p.add_argument("--epochs", type=int, default=2, help="figures are from the last epoch (the first warms up)")
    p.add_argument("--compressors", nargs="+", default=list(COMPRESSORS), choices=list(COMPRESSORS))
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS),
                   help="dat: --attack at --micro-batch; comm-heavy: natural training at micro batch 4")
    p.add_argument("--timeout", type=float, default=900, help="seconds per two-node job")
    p.add_argument("--probe-mb", type=int, default=PROBE_MB, help="MB of the raw gloo check of the link")
    p.add_argument("--name", default="link", help="results file bench/results/NAME.json")
    p.add_argument("--add", action="store_true",
                   help="keep the other links' rows of the results file and put this link's beside them")
    p.add_argument("--probe-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--probe-addr", help=argparse.SUPPRESS)
    p.add_argument("--probe-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe_rank is not None:
        return probe(args.probe_rank, args.probe_addr, args.probe_port, args.probe_mb)
    label = link_label(args.rate, args.delay)
    args.attack_flags = []
    settings = {k: v for k, v in vars(args).items()
                if not k.startswith("probe") and k not in ("attack_flags", "name", "add")}
    settings.update(nodes=2, ranks_per_node=1, dataset="fashion_mnist", stem="auto (small: 3x3 stride 1)",
                    ds_config="ds_configs/lamb_fp32.json with the micro batch above",
                    launcher="deepspeed --no_ssh --node_rank K --num_nodes 2 --num_gpus 1 (one per namespace)",
                    comm_timeout="the recipe's default, 600 s")
    title = f"Two nodes on a {label} link: DAT step time per compressor"
    why_not = netns.available()
    if why_not:
        print(f"link benchmark skipped: {why_not}")
        if not args.add:
            save(args.name, {"title": title, "machine": machine(), "settings": settings, "rows": [],
                             "notes": [f"not run: {why_not}; run `make bench` as root for this table"]})
        return

    results = []
    with netns.Link(rate=args.rate, delay=args.delay) as link, \
            tempfile.TemporaryDirectory(prefix="link_bench_") as tmp:
        workdir = Path(tmp)
        link_info = {"namespaces": link.ns, "addresses": link.addrs, "qdisc": link.qdisc(0),
                     "delay_each_way": args.delay, "delay_line": "user-space TUN wire" if args.delay else None}
        print(f"namespaces {link.ns}, {link.addrs}, qdisc: {link_info['qdisc']}, delay {args.delay}", flush=True)
        probe_result = run_probe(link, 29400, 300, args.probe_mb)
        print(f"raw gloo over the link: send {probe_result['send_gbit_s']:.3f} Gbit/s, "
              f"all_reduce {probe_result['all_reduce_gbit_s']:.3f} Gbit/s ({args.probe_mb} MB)", flush=True)
        jobs = [(scenario, name) for scenario in args.scenarios for name in args.compressors]
        for i, (scenario, name) in enumerate(jobs):
            r = run_recipe(link, name, args, 29500 + i, workdir, scenario)
            results.append({"link": label, **r})
            print(f"{scenario:>10} {LABELS[name]:>22}: {r['step_s']:.3f} s/step (compute {r['compute_s']:.2f} s, "
                  f"comm {r['comm_s']:.2f} s per epoch), {r['bytes_per_rank'] / 1e6:.1f} MB/rank/epoch", flush=True)
    names = netns.ours()
    assert not any(n in names for n in link.ns), "namespaces left behind"

    rows, notes = summarize(results, probe_result, args.rate, label)
    m = machine()
    if args.delay:
        notes += link_notes(results, args, m)
    payload = {"title": title, "machine": m, "settings": settings, "link": link_info,
               "probe": probe_result, "rows": rows, "raw": results, "notes": notes,
               "bars": {f"s/step, {sc}": {r["label"]: r["step_s"] for r in results if r["scenario"] == sc}
                        for sc in args.scenarios}}
    save(args.name, merged(args.name, payload, label) if args.add else payload)
    print(f"written: bench/results/{args.name}.json")


def link_notes(results: list, args, m: dict) -> list:
    """What a delayed link's rows rest on: how the delay was made, the watchdog's margin, the run's
    size, the machine (``m``)."""
    longest = max(r["step_s"] for r in results)
    fp32 = next((r for r in results if r["compressor"] == "none"), None)
    exchange = ""
    if fp32 is not None:
        sent = fp32["bytes_per_rank"] / fp32["steps_per_epoch"]
        exchange = (f"; the fp32 exchange of {args.backbone}'s gradient sends {sent / 1e6:.1f} MB per rank and "
                    f"step, {8 * sent / rate_bits(args.rate):.1f} s at {args.rate} before round trips")
    return [f"delay: {args.delay} each way through a user-space delay line between two TUN devices (this kernel "
            f"has no sch_netem), each device shaped by tbf at {args.rate}, MTU {netns.WIRE_MTU}",
            f"every job ran with the recipe's default --comm-timeout (600 s); none tripped it. The watchdog "
            f"measures the time between optimizer steps (and the process group bounds each collective by the "
            f"same figure): the slowest step here averaged {longest:.1f} s{exchange}",
            f"size run: {len(results)} two-node jobs ({', '.join(args.scenarios)}; {', '.join(args.compressors)}), "
            f"{args.steps} steps per epoch x {args.epochs} epochs each (figures from the last epoch), "
            f"micro batch {args.micro_batch}, probe {args.probe_mb} MB",
            f"measured {m.get('date')} on a shared {m.get('cores')}-core machine (load average "
            f"{m.get('load_avg_1m')} at the end): absolute seconds are noisy; the speed-ups and shares of the ideal "
            f"are ratios of rows measured one after another in the same run. Rows of different links come from "
            f"different runs and days: compare their ratios, not their seconds",
            "a share of the ideal above 100% means that row's computation ran faster than the fp32 row's (the "
            "cores are shared, so compute s moves by tens of percent from row to row); the comm s column, "
            "time inside the collectives, is the steadier comparison"]


if __name__ == "__main__":
    main()
