"""Run every compressor on real gloo ranks and save what each rank ends with (used by the tests).

    python tests/scripts/compress_worker.py --out DIR --worlds 2 3 4

For each world size the script starts that many ranks (torch.multiprocessing, gloo over
loopback). Every rank exchanges its own gradients (different per rank) through each
configuration in ``configs(world)`` ``STEPS`` times and saves ``DIR/world{N}_rank{R}.pt``: per
configuration the input flat gradient, the last output and the sum of the outputs, the bytes
each exchange reported, and the compressor's state. ``DIR/world{N}_rank{R}_hooks.pt`` holds
``powersgd`` and ``bf16`` side by side with DDP's own PowerSGD and bf16 communication hooks.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dat_ds import compress  # noqa: E402
from dat_ds.dist import free_port  # noqa: E402

# awkward sizes: the flat gradient (3,481 values) splits into neither shards nor buckets
SHAPES = [(3, 5), (1000,), (7, 11, 13), (1465,)]
STEPS = 3


def configs(world: int):
    """(key, compressor name, settings, Byzantine?) for one world size."""
    out = [("none", "none", {}, False)]
    for topology in compress.TOPOLOGIES:
        for bits in (1, 3, 4, 8, 16):
            out.append((f"qsgd bits={bits} {topology}", "qsgd", {"bits": bits, "bucket_size": 64, "topology": topology},
                        False))
        out.append((f"sign_vote {topology}", "sign_vote", {"topology": topology}, False))
        out.append((f"sign_vote momentum=0.9 {topology}", "sign_vote", {"momentum": 0.9, "topology": topology}, False))
        out.append((f"ef_sign {topology}", "ef_sign", {"bucket_size": 128, "topology": topology}, False))
    out.append(("bf16", "bf16", {}, False))
    for rank in (1, 2):
        out.append((f"powersgd rank={rank}", "powersgd", {"matrix_rank": rank}, False))
    if world >= 3:  # one Byzantine rank (the last) is a minority
        bad = (world - 1,)
        for topology in compress.TOPOLOGIES:
            for mode in ("flip", "random"):
                out.append((f"byzantine sign_vote {mode} {topology}", "sign_vote",
                            {"topology": topology, "byzantine_ranks": bad, "byzantine_mode": mode}, True))
            signum = {"momentum": 0.5, "topology": topology, "byzantine_ranks": bad, "byzantine_mode": "flip"}
            out.append((f"byzantine sign_vote momentum=0.5 flip {topology}", "sign_vote", signum, True))
        out.append(("byzantine none scale", "none", {"byzantine_ranks": bad, "byzantine_mode": "scale"}, True))
    return out


def gradients(rank: int, byzantine_case: bool):
    if byzantine_case:
        # every rank sees the same direction with its own positive noise: honest signs agree
        base = [torch.randn(s, generator=torch.Generator().manual_seed(7)) for s in SHAPES]
        gen = torch.Generator().manual_seed(100 + rank)
        return [b * (0.5 + torch.rand(b.shape, generator=gen)) for b in base]
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(s, generator=gen) * (1 + i) for i, s in enumerate(SHAPES)]


# PowerSGD against DDP's own hook: matrices of one shape twice (the hook groups them by shape),
# a 3-d tensor, vectors, and a matrix too small to be worth compressing
HOOK_SHAPES = [(6, 20), (30,), (5, 4, 3), (6, 20), (50, 40), (3, 2)]


class FakeBucket:
    """What ``powerSGD_hook`` reads of a ``dist.GradBucket``: one flat buffer and its views."""

    def __init__(self, flat, shapes):
        self._flat, self._views, offset = flat, [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            self._views.append(flat[offset:offset + n].view(s))
            offset += n

    def buffer(self):
        return self._flat

    def index(self):
        return 0

    def is_last(self):
        return True

    def gradients(self):
        return self._views

    def parameters(self):
        return self._views


def powersgd_against_hook(rank: int, start_iter: int = 0) -> dict:
    """STEPS exchanges of the same per-rank gradients through ``powersgd`` (rank 2) and through
    ``powerSGD_hook`` on a fake bucket, both from the same seed: every output and the errors.
    ``start_iter``: that many plain all-reduces first (the hook's ``start_powerSGD_iter``)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ph
    gen = torch.Generator().manual_seed(500 + rank)
    grads = [torch.randn(s, generator=gen) for s in HOOK_SHAPES]
    ours = compress.create("powersgd", matrix_rank=2, random_seed=7, start_iter=start_iter)
    state = ph.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=max(start_iter, 2),
                             min_compression_rate=2.0, orthogonalization_epsilon=1e-8, random_seed=7)
    state.iter = state.start_powerSGD_iter - start_iter  # the hook insists on >= 2 vanilla steps: skip the rest
    mine, hook = [], []
    for _ in range(STEPS + start_iter):
        out = [g.clone() for g in grads]
        ours.all_reduce_(out)
        mine.append(compress.flatten(out))
        flat = compress.flatten(grads)
        ph.powerSGD_hook(state, FakeBucket(flat, HOOK_SHAPES)).wait()
        hook.append(flat.clone())
    return {"ours": torch.stack(mine), "hook": torch.stack(hook), "our_error": ours.state_dict()["error"],
            "hook_error": state.error_dict[0]}


def bf16_against_hook(rank: int) -> dict:
    """One exchange through ``bf16`` and through DDP's ``bf16_compress_hook``, same gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    gen = torch.Generator().manual_seed(600 + rank)
    grads = [torch.randn(s, generator=gen) for s in HOOK_SHAPES]
    out = [g.clone() for g in grads]
    compress.create("bf16").all_reduce_(out)
    flat = compress.flatten(grads)
    default_hooks.bf16_compress_hook(None, FakeBucket(flat, HOOK_SHAPES)).wait()
    return {"ours": compress.flatten(out), "hook": flat, "in": compress.flatten(grads)}


def none_with_bf16_grads(rank: int) -> dict:
    """``none`` on bf16 gradients (DeepSpeed's bf16 mode): the dtypes its all-reduce saw."""
    seen = []
    original = tdist.all_reduce

    def recording(tensor, *args, **kwargs):
        seen.append(str(tensor.dtype))
        return original(tensor, *args, **kwargs)

    gen = torch.Generator().manual_seed(700 + rank)
    grads = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES]
    out = [g.clone() for g in grads]
    tdist.all_reduce = recording
    try:
        compress.create("none").all_reduce_(out)
    finally:
        tdist.all_reduce = original
    return {"in": compress.flatten(grads), "out": compress.flatten(out), "dtypes": seen}


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for key, name, kw, byzantine_case in configs(world):
        grads = gradients(rank, byzantine_case)
        compressor = compress.create(name, generator=torch.Generator().manual_seed(1000 + rank), **kw)
        sent, seconds, total = [], [], 0
        for _ in range(STEPS):  # the same gradients every step: error feedback telescopes
            out = [g.clone() for g in grads]
            stats = compressor.all_reduce_(out)
            sent.append(stats.bytes_sent)
            seconds.append(stats.comm_seconds)
            total = total + compress.flatten(out)
        results[key] = {"in": compress.flatten(grads), "out": compress.flatten(out), "out_sum": total,
                        "bytes": sent, "comm_seconds": seconds, "state": compressor.state_dict()}
    torch.save(results, Path(out_dir) / f"world{world}_rank{rank}.pt")
    torch.save({"powersgd": powersgd_against_hook(rank), "powersgd start_iter=2": powersgd_against_hook(rank, 2),
                "bf16": bf16_against_hook(rank),
                "none bf16 grads": none_with_bf16_grads(rank)},
               Path(out_dir) / f"world{world}_rank{rank}_hooks.pt")
    tdist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # fork where there is one: the ranks inherit the imported torch instead of importing it again
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    for world in args.worlds:
        mp.start_processes(run, args=(world, free_port(), args.out), nprocs=world, start_method=method)


if __name__ == "__main__":
    main()
