"""Gradient exchange cost per compressor on real gloo ranks, against the fp32 all-reduce.

The gradient is ResNet-18's (timm ``resnet18``, 11.7 M values in 62 tensors, one list of
tensors with its parameter shapes). The script starts ``--ranks`` gloo ranks on this machine
(torch.multiprocessing, one thread each) and times ``compressor.all_reduce_`` for every
configuration, interleaved (A B C A B C ...), median over ``--repeats`` rounds, slowest rank.

Per configuration: bytes sent per rank (the module's convention), the exchange time on
loopback, the encode+decode time (the CPU time of the rank's thread inside ``all_reduce_``:
flatten, encode, every decode, state updates; the wall time outside collectives is shown
too), its throughput in GB/s of fp32 gradient, and the time modeled for a 1 Gbit/s link:
bytes / 125 MB/s + encode+decode time, next to the fp32 all-reduce on the same link. CPU time
keeps the model honest on a shared machine, where other processes stretch wall times; the
load average is printed with the table.

    python bench/compress_bench.py                 # 2 ranks, 7 rounds
    python bench/compress_bench.py --ranks 4 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import machine, save, table  # noqa: E402

from dat_ds import compress  # noqa: E402
from dat_ds.dist import free_port  # noqa: E402

LINK_BYTES_PER_S = 125e6  # 1 Gbit/s

CONFIGS = [("fp32 all-reduce", "none", {})]
for _topology in ("one-sided", "two-sided"):
    for _bits in (8, 4, 2):
        CONFIGS.append((f"qsgd {_bits}-bit {_topology}", "qsgd", {"bits": _bits, "bucket_size": 512,
                                                               "topology": _topology}))
    CONFIGS.append((f"sign_vote {_topology}", "sign_vote", {"topology": _topology}))
    CONFIGS.append((f"ef_sign {_topology}", "ef_sign", {"bucket_size": 2048, "topology": _topology}))


def resnet18_shapes():
    import timm
    model = timm.create_model("resnet18", pretrained=False)
    return [tuple(p.shape) for p in model.parameters()]


def rank_main(rank, world, port, shapes, repeats, queue):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    source = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    grads = [g.clone() for g in source]
    compressors = {key: compress.create(name, **kw) for key, name, kw in CONFIGS}
    samples = {key: {"total": [], "comm": [], "cpu": [], "bytes": []} for key in compressors}

    def exchange(key):
        torch._foreach_copy_(grads, source)  # same gradient every round, outside the timer
        tdist.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        stats = compressors[key].all_reduce_(grads)
        return time.perf_counter() - t0, time.thread_time() - c0, stats

    for key in compressors:  # warm-up: workspaces, error buffers, gloo connections
        exchange(key)
    for _ in range(repeats):
        for key in compressors:
            total, cpu, stats = exchange(key)
            samples[key]["total"].append(total)
            samples[key]["comm"].append(stats.comm_seconds)
            samples[key]["cpu"].append(cpu)
            samples[key]["bytes"].append(stats.bytes_sent)
    medians = {key: {"total": statistics.median(s["total"]), "codec": statistics.median(s["cpu"]),
                     "outside_collectives": statistics.median(t - c for t, c in zip(s["total"], s["comm"])),
                     "bytes": s["bytes"][-1]} for key, s in samples.items()}
    everyone = [None] * world
    tdist.all_gather_object(everyone, medians)
    if rank == 0:
        queue.put(everyone)
    tdist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--name", default="compress", help="results file bench/results/NAME.json")
    args = p.parse_args()

    load_before = os.getloadavg()
    shapes = resnet18_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(rank_main, args=(args.ranks, free_port(), shapes, args.repeats, queue), nprocs=args.ranks,
                       start_method="spawn", join=False)
    per_rank = queue.get()
    # an exchange ends when its slowest rank does
    result = {key: {m: max(r[key][m] for r in per_rank) for m in per_rank[0][key]} for key, _, _ in CONFIGS}

    ref = result["fp32 all-reduce"]
    ref_link = ref["bytes"] / LINK_BYTES_PER_S + ref["codec"]
    rows = []
    for key, r in result.items():
        link = r["bytes"] / LINK_BYTES_PER_S + r["codec"]
        r.update(link_1gbit=link, gbps=4 * numel / r["codec"] / 1e9)
        rows.append([key, f"{r['bytes'] / 1e6:.2f}", f"{ref['bytes'] / r['bytes']:.1f}x", f"{1e3 * r['total']:.1f}",
                     f"{r['total'] / ref['total']:.2f}", f"{1e3 * r['outside_collectives']:.1f}",
                     f"{1e3 * r['codec']:.1f}", f"{r['gbps']:.2f}", f"{1e3 * link:.0f}", f"{link / ref_link:.2f}"])
    headers = ["configuration", "MB sent/rank", "less than fp32", "exchange ms", "vs fp32", "outside coll. ms",
               "encode+decode CPU ms", "GB/s", "1 Gbit/s model ms", "model vs fp32"]
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"\nmachine: {machine()}")
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}: other processes share "
          f"the cores when it exceeds {args.ranks}")
    print(f"{args.ranks} gloo ranks on loopback, 1 thread each; gradient: resnet18, {numel / 1e6:.2f} M fp32 values "
          f"in {len(shapes)} tensors; median of {args.repeats} interleaved rounds, slowest rank\n")
    print(table(headers, rows))
    print("\nexchange: wall time of all_reduce_ on loopback. outside coll.: its wall time outside collectives. "
          "encode+decode CPU: CPU time of the rank's thread in all_reduce_ (flatten, encode, every decode, state "
          "updates, unflatten; gloo moves bytes on its own threads), unaffected by other processes taking turns "
          "on the cores; GB/s of fp32 gradient through it.\n1 Gbit/s model: bytes sent / 125 MB/s + encode+decode "
          "CPU, against the fp32 ring all-reduce on the same link.")
    settings = {**vars(args), "numel": numel, "tensors": len(shapes)}
    path = save(args.name, {"machine": machine(), "load_average": load, "settings": settings,
                            "configs": {k: {"compressor": n, **kw} for k, n, kw in CONFIGS}, "results": result,
                            "table": {"headers": headers, "rows": rows}})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
