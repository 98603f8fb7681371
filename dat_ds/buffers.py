"""One model on every rank: BatchNorm statistics pooled across ranks before an evaluation or a save.

Weights are the same on every rank (the gradient exchange averages them into one update), but
each rank's BatchNorm running statistics are averages over its own shard only: N ranks hold N
models that differ in their buffers. Every evaluation and every checkpoint first makes them one.

DDP's ``broadcast_buffers`` copies rank 0's buffers to the others, which throws away what the
other shards saw; with data that differs per rank (a shard per node, classes per node) rank 0's
statistics describe rank 0's data only. Here the statistics are pooled instead, as if every
rank's batches had been one population of equal-sized parts (the law of total variance)::

    mean = (1/N) sum_r mean_r
    var  = (1/N) sum_r (var_r + mean_r^2) - mean^2

one all-reduce for all BatchNorm layers together (float64, on the buffers' device); every other
buffer (step counters, position indices) is broadcast from rank 0, one collective per dtype. With
one rank nothing moves. ``torch.nn.SyncBatchNorm`` (``--sync-bn`` on GPUs) computes the batch
statistics over every rank in each forward instead; the pooled result then changes nothing.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as tdist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import dist

MEAN, VAR = "running_mean", "running_var"


def batchnorm_pairs(names: Sequence[str]) -> List[Tuple[int, int]]:
    """Index pairs ``(running_mean, running_var)`` of the same layer among buffer ``names``."""
    index = {n: i for i, n in enumerate(names)}
    pairs = []
    for name, i in index.items():
        if name == MEAN or name.endswith("." + MEAN):
            var = name[: -len(MEAN)] + VAR
            if var in index:
                pairs.append((i, index[var]))
    return pairs


@torch.no_grad()
def pool(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Make ``tensors`` (buffers named ``names``, in the same order on every rank) identical
    across ranks, in place: BatchNorm statistics pooled, the rest rank 0's."""
    if dist.world_size() == 1 or not tensors:
        return
    pairs = batchnorm_pairs(names)
    if pairs:
        _pool_statistics([tensors[m] for m, _ in pairs], [tensors[v] for _, v in pairs])
    paired = {i for pair in pairs for i in pair}
    _broadcast([t for i, t in enumerate(tensors) if i not in paired])


def _pool_statistics(means: List[torch.Tensor], variances: List[torch.Tensor]) -> None:
    world = dist.world_size()
    mean = _flatten_dense_tensors([m.double() for m in means])
    second = _flatten_dense_tensors([v.double() for v in variances]) + mean * mean
    both = torch.cat([mean, second])
    tdist.all_reduce(both)
    both /= world
    mean, second = both.split(mean.numel())
    var = (second - mean * mean).clamp_min_(0)
    for target, value in zip(means + variances, _unflatten_dense_tensors(mean, means)
                             + _unflatten_dense_tensors(var, variances)):
        target.copy_(value)


def _broadcast(tensors: List[torch.Tensor]) -> None:
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = _flatten_dense_tensors(group)
        tdist.broadcast(flat, src=0)
        for target, value in zip(group, _unflatten_dense_tensors(flat, group)):
            target.copy_(value)


def sync_module(module: torch.nn.Module) -> None:
    """``module``'s buffers made identical on every rank (see the module docstring)."""
    named = list(module.named_buffers())
    pool([n for n, _ in named], [b for _, b in named])


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every BatchNorm layer a ``torch.nn.SyncBatchNorm`` (statistics over all ranks
    in each training forward); ``ValueError`` where torch cannot run it (CPU ranks)."""
    if dist.world_size() > 1 and dist.device().type == "cpu":
        raise ValueError("--sync-bn needs GPUs: torch's SyncBatchNorm runs on CUDA devices only (on CPU ranks "
                         "the statistics are pooled across ranks before every evaluation and save)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
