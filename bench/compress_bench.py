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

Before the exchange table, a codec table on one thread of this process: every compressor's
encode + decode of the same gradient at world size 1 (one-sided: encode, the payload copied as
a one-rank all_gather, decode), side by side with a plain copy of the same buffer, the
physical limit; CPU time of the thread, robust to other processes on the machine. "before" is
the codecs' first eager kernels (``use_baseline_codec``) through ``all_reduce_`` on the list of
gradients (flatten, encode, decode, unflatten); "after" is the fused kernels (compiled by
inductor unless ``DAT_DS_COMPILE=0``) on one persistent flat buffer (``all_reduce_flat_``, what
``compress.exchange`` runs). GB/s of fp32 gradient per core, the ratio to the copy's GB/s, and
the first call's compile time.

    python bench/compress_bench.py                 # 2 ranks, 7 rounds
    python bench/compress_bench.py --ranks 4 --repeats 5
    python bench/compress_bench.py --skip-exchange # the codec table only
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
CONFIGS += [("bf16 all-reduce", "bf16", {}), ("powersgd rank 1", "powersgd", {"matrix_rank": 1}),
            ("powersgd rank 4", "powersgd", {"matrix_rank": 4})]
CODEC_CONFIGS = [("fp32 (none: no codec)", "none", {}), ("bf16", "bf16", {})] + \
    [(f"qsgd {b}-bit", "qsgd", {"bits": b, "bucket_size": 512}) for b in (8, 4, 2, 1)] + \
    [("sign_vote", "sign_vote", {}), ("ef_sign", "ef_sign", {"bucket_size": 2048}),
     ("powersgd rank 1", "powersgd", {"matrix_rank": 1}), ("powersgd rank 4", "powersgd", {"matrix_rank": 4})]


def resnet18_shapes():
    import timm
    model = timm.create_model("resnet18", pretrained=False)
    return [tuple(p.shape) for p in model.parameters()]


def _best(fn, repeats: int, prepare=None) -> float:
    """Median CPU seconds of this thread in ``fn()`` over ``repeats`` calls (``prepare()``
    untimed before each): on a shared machine other processes stretch wall times, not this."""
    times = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def codec_table(shapes, repeats: int) -> dict:
    """Encode + decode on one thread at world size 1, before and after, against a copy."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    source = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    grads = [g.clone() for g in source]
    numel = sum(g.numel() for g in source)
    flat_source = torch.cat([g.reshape(-1) for g in source])
    copy_into = torch.empty_like(flat_source)
    copy_into.copy_(flat_source)
    copy_s = _best(lambda: copy_into.copy_(flat_source), 2 * repeats)
    results = {"copy": {"seconds": copy_s, "gbps_per_core": 4 * numel / copy_s / 1e9}}
    rows = [["copy of the buffer", "", f"{1e3 * copy_s:.1f}", f"{4 * numel / copy_s / 1e9:.2f}", "1.00", "", "", "",
             "", ""]]
    for key, name, kw in CODEC_CONFIGS:
        before = compress.create(name, **kw)
        if hasattr(before, "use_baseline_codec"):
            before.use_baseline_codec()
        after = compress.create(name, **kw)
        flat = torch.zeros(after.padded_numel(numel, 1))
        shape_list = [g.shape for g in source]
        t0 = time.perf_counter()
        after.all_reduce_flat_(flat.copy_(torch.nn.functional.pad(flat_source, (0, flat.numel() - numel))), numel,
                               shape_list)
        first = time.perf_counter() - t0     # includes compiling the kernels (or loading them from the cache)
        before.all_reduce_(grads)            # warm-up: workspaces
        t_before = _best(lambda: before.all_reduce_(grads), repeats, lambda: torch._foreach_copy_(grads, source))
        t_after = _best(lambda: after.all_reduce_flat_(flat, numel, shape_list), repeats,
                        lambda: flat[:numel].copy_(flat_source))
        gb_before, gb_after = 4 * numel / t_before / 1e9, 4 * numel / t_after / 1e9
        results[key] = {"compressor": name, **kw, "before_seconds": t_before, "after_seconds": t_after,
                        "before_gbps_per_core": gb_before, "after_gbps_per_core": gb_after,
                        "before_ratio_to_copy": gb_before / results["copy"]["gbps_per_core"],
                        "after_ratio_to_copy": gb_after / results["copy"]["gbps_per_core"],
                        "speedup": t_before / t_after, "first_call_seconds": first}
        r = results[key]
        rows.append([key, f"{1e3 * t_before:.1f}", f"{1e3 * t_after:.1f}", f"{gb_before:.2f}", f"{gb_after:.2f}",
                     f"{r['before_ratio_to_copy']:.3f}", f"{r['after_ratio_to_copy']:.3f}", f"{r['speedup']:.1f}x",
                     f"{first:.1f}", "compiled" if compress.kernels.use_compiled(numel) else "eager"])
    rows[0] = ["copy of the buffer", f"{1e3 * copy_s:.1f}", f"{1e3 * copy_s:.1f}",
               f"{results['copy']['gbps_per_core']:.2f}", f"{results['copy']['gbps_per_core']:.2f}", "1.000",
               "1.000", "", "", ""]
    headers = ["codec (world size 1)", "before ms", "after ms", "before GB/s/core", "after GB/s/core",
               "before / copy", "after / copy", "speedup", "first call s", "kernels"]
    print(f"\nmachine: {machine()}")
    print(f"codec on 1 thread: resnet18 gradient, {numel / 1e6:.2f} M fp32 values; median CPU time of {repeats} "
          f"calls; GB/s of fp32 gradient through encode + decode; '/ copy': that GB/s over a plain copy's\n")
    print(table(headers, rows))
    print("\nbefore: first eager kernels via all_reduce_ on the gradient list (flatten + unflatten included). after: "
          "fused kernels on the persistent flat buffer. first call: the after path's first exchange, compile (or "
          "cache load) included.")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return {"results": results, "compile_seconds": dict(compress.kernels.COMPILE_SECONDS),
            "table": {"headers": headers, "rows": rows}}


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
    p.add_argument("--skip-exchange", action="store_true", help="only the one-thread codec table")
    args = p.parse_args()

    load_before = os.getloadavg()
    shapes = resnet18_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    codec = codec_table(shapes, args.repeats)
    if args.skip_exchange:
        save(args.name, {"machine": machine(), "load_average": {"before": load_before, "after": os.getloadavg()},
                         "settings": {**vars(args), "numel": numel, "tensors": len(shapes)}, "codec": codec})
        return
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
                            "table": {"headers": headers, "rows": rows}, "codec": codec})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
