"""``nccl``: DAT steps (PGD) with every compressor over the process group of the machine's GPUs
(nccl; one GPU is world size 1), ranks spawned by ``torch.multiprocessing``: seconds per step,
bytes sent, and whether every rank ends with bit-identical weights."""
from __future__ import annotations

import math
import os
import queue as queue_lib
import time
from dataclasses import asdict

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from dat_ds import attacks, compress, dist

from .harness import (EPS, Bench, Clock, Plan, _describe, _plan_from, build_bench, dat_ds_run, guarded,
                      peak_memory_gb, reset_peak_memory)


def nccl_section(plan: Plan, device: torch.device, clock: Clock, deadline: float) -> dict:
    """``plan.dist_steps`` DAT steps per compressor on ranks spawned over the machine's GPUs; a
    rendezvous port taken by another process between its choice and its use is chosen anew."""
    for attempt in range(3):
        try:
            return _spawned_steps(plan, device, deadline)
        except RuntimeError as err:
            if "EADDRINUSE" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _spawned_steps(plan: Plan, device: torch.device, deadline: float) -> dict:
    world = torch.cuda.device_count() if device.type == "cuda" else 1
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(rank_main, args=(world, dist.free_port(), asdict(plan), results), nprocs=world,
                               join=False, start_method="spawn")
    per_rank = {}
    try:
        while len(per_rank) < world and time.monotonic() < deadline:
            try:
                rank, payload = results.get(timeout=5)
                per_rank[rank] = payload
            except queue_lib.Empty:
                if procs.join(timeout=0):  # all exited (raises if one died)
                    break
    finally:
        for p in procs.processes:
            p.join(timeout=30 if len(per_rank) == world else 0)
            if p.is_alive():  # a rank that outlived the budget or waits on a dead peer
                p.kill()
    if len(per_rank) < world:
        raise RuntimeError(f"{world - len(per_rank)} of {world} ranks reported nothing (time budget or a crash)")
    errors = [p["error"] for p in per_rank.values() if "error" in p]
    if errors:
        raise RuntimeError(errors[0])
    return per_rank[0]


def rank_main(rank: int, world: int, port: int, plan: dict, results) -> None:
    """One rank of the nccl section (a spawned process): reports its result or its error."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init()
        results.put((rank, dat_steps(_plan_from(plan))))
    except Exception as err:  # the parent records it: one rank's failure must not hang the others' report
        results.put((rank, {"error": _describe(err)}))


def dat_steps(plan: Plan) -> dict:
    device = dist.device()
    clock = Clock(device)
    reset_peak_memory(device)
    b = build_bench(plan.dist_model, plan, device, seed=1 + dist.rank())  # other data on every rank
    attack = attacks.create("pgd", eps=EPS, steps=plan.dist_pgd_steps, alpha=2.5 * EPS / plan.dist_pgd_steps)
    out = {"backend": tdist.get_backend(), "world_size": dist.world_size(), "model": plan.dist_model.name,
           "batch_per_rank": plan.dist_model.batch, "pgd_steps": plan.dist_pgd_steps, "steps": plan.dist_steps,
           "compressors": []}
    for name in compress.names():
        out["compressors"].append(guarded(dat_steps_one, b, name, attack, plan, clock, compressor=name))
    none = next((c for c in out["compressors"] if c.get("compressor") == "none" and "s_per_step" in c), None)
    for c in out["compressors"]:
        if none is not None and "s_per_step" in c:
            c["time_vs_none"] = c["s_per_step"] / none["s_per_step"]
    out["peak_memory_gb"] = peak_memory_gb(device)
    return out


def dat_steps_one(b: Bench, name: str, attack, plan: Plan, clock: Clock) -> dict:
    run = dat_ds_run(b, attack, compress.create(name), label=f"dist-{name}")
    run(1)  # first exchange: buffers, compiled kernels, communicator set-up
    b.timers[f"dist-{name}"].reset()
    result = {}
    seconds = clock.time(lambda: result.update(run(plan.dist_steps)))
    phases = b.timers[f"dist-{name}"].reset()
    compute = sum(v for k, v in phases.items() if k != "comm")
    digest = torch.stack([torch.cat([p.detach().reshape(-1).double() for p in b.engine.module.parameters()]).sum(),
                          *(p.detach().double().abs().sum() for p in b.engine.module.parameters())])
    digests = dist.all_gather_object(digest.cpu().tolist())
    return {"compressor": name, "s_per_step": seconds / plan.dist_steps, "loss": result["train_loss"],
            "finite": math.isfinite(result["train_loss"]), "bytes_per_step": result["bytes_sent"] / plan.dist_steps,
            "comm_share": phases.get("comm", 0.0) / max(compute + phases.get("comm", 0.0), 1e-12),
            "identical_across_ranks": all(d == digests[0] for d in digests)}

