"""``powersgd``: PowerSGD (Vogels, Karimireddy and Jaggi 2019), low-rank gradients with error feedback."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize, _should_compress

from .base import COMPRESSORS, Compressor, Payload
from .byzantine import _check_byzantine, corrupt_
from .collectives import CommStats, _timed, _world
from .settings import _check_int
from .workspace import Workspace

EPSILON = 1e-8   # keeps an all-zero gradient matrix from dividing by a zero norm


@dataclass
class _Group:
    """``count`` matrices of one shape (rows, cols) and rank, stacked: batched products and one
    batched orthogonalization serve them all."""
    rows: int
    cols: int
    rank: int
    count: int
    m_at: int  # where the group starts in the stacked matrices
    p_at: int  # ... in P memory
    q_at: int  # ... in Q memory


@dataclass
class _Layout:
    """Where each gradient sits in the flat buffer and how it is sent."""
    matrices: List[Tuple[int, int, int, int]]    # (offset, rows, cols, rank), grouped by shape like DDP's hook
    vectors: List[Tuple[int, int]]               # (offset, numel): sent as fp32
    p_numel: int
    q_numel: int
    v_numel: int
    groups: List[_Group] = field(default_factory=list)
    sizes: List[int] = field(default_factory=list)  # every tensor's numel, in the flat buffer's order
    matrix_index: List[int] = field(default_factory=list)  # the matrices among them, in group order
    vector_index: List[int] = field(default_factory=list)

    @property
    def m_numel(self) -> int:
        return sum(n * m for _, n, m, _ in self.matrices)

    @property
    def matrix_sizes(self) -> List[int]:
        return [n * m for _, n, m, _ in self.matrices]

    @property
    def vector_sizes(self) -> List[int]:
        return [numel for _, numel in self.vectors]


def _groups(matrices: List[Tuple[int, int, int, int]]) -> List[_Group]:
    groups: List[_Group] = []
    m_at = p_at = q_at = 0
    for _, n, m, r in matrices:
        last = groups[-1] if groups else None
        if last is not None and (last.rows, last.cols, last.rank) == (n, m, r):
            last.count += 1
        else:
            groups.append(_Group(n, m, r, 1, m_at, p_at, q_at))
        m_at, p_at, q_at = m_at + n * m, p_at + n * r, q_at + m * r
    return groups


@COMPRESSORS.register("powersgd")
class PowerSGD(Compressor):
    """PowerSGD with error feedback and warm start: the math of DDP's ``powerSGD_hook``.

    Every gradient of 2 or more dimensions, viewed as an (n, m) matrix M (its first dimension
    by the rest), is sent as rank-r factors when that saves more than ``min_compression_rate``
    (r (n + m) times that rate < n m); the other gradients (biases, norms) are all-reduced in
    fp32. Per step, with the local error e added first (M <- M + e): Q is orthogonalized; P =
    M Q is all-reduced (summed) and orthogonalized; Q = M^T P is all-reduced and averaged;
    M <- P Q^T; e <- (M + e) before - after, over the whole buffer. Q is kept for the next step
    (warm start); the first Q is standard normal, seeded from ``random_seed`` the way the hook
    seeds it. Three all-reduces per step; bytes: 2 (N - 1) / N * 4 (|P| + |Q| + |vectors|).
    The first ``start_iter`` exchanges are plain fp32 all-reduces (the hook's
    ``start_powerSGD_iter``: compressing the first, fast-changing gradients costs accuracy).
    On a GPU, matrices of one shape are stacked and handled together (batched products, one
    batched orthogonalization per shape, as the hook's ``batch_tensors_with_same_shape``) and the
    vectors are gathered in one copy: a few kernels per shape, not several per tensor (ResNet-50:
    21 shapes for 54 matrices and 107 vectors). On the CPU, one product per matrix in place is
    faster (``grouped``); both forms send the same bytes and compute the same numbers.
    ``use_baseline_codec()`` takes the per-tensor form everywhere (the benchmarks' "before").

    Settings:
        matrix_rank: the approximation rank r (1, the default of the paper and of DDP).
        min_compression_rate: compress a matrix only if it shrinks by more than this factor.
        random_seed: seed of the first Q.
        start_iter: exchanges sent uncompressed (fp32 mean) before compression starts (0).
        byzantine_ranks, byzantine_mode: corrupted ranks (experiments only).

    State: ``error`` (the flat gradient's residual), ``q`` (the warm-start factors) and
    ``exchanges`` (how many were made: a resumed run starts compressing at the same step).
    """

    name = "powersgd"
    state_names = ("error", "q", "exchanges")
    # the grouped form (True) or the per-tensor one (False); None: grouped on a GPU, where a few
    # batched kernels replace hundreds of launches, per tensor on the CPU, whose batched products
    # run several times slower than one product per matrix (and the stacking copies gain nothing)
    grouped: Optional[bool] = None

    def __init__(self, matrix_rank: int = 1, min_compression_rate: float = 2.0, random_seed: int = 0,
                 start_iter: int = 0, byzantine_ranks: Sequence[int] = (), byzantine_mode: str = "scale",
                 generator: Optional[torch.Generator] = None):
        self.rank = _check_int("matrix_rank", matrix_rank, 1)
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)) \
                or not min_compression_rate > 0:
            raise ValueError(f"min_compression_rate={min_compression_rate!r} is not allowed; "
                             f"min_compression_rate must be a positive number")
        self.min_compression_rate = float(min_compression_rate)
        self.random_seed = _check_int("random_seed", random_seed, 0)
        self.start_iter = _check_int("start_iter", start_iter, 0)
        self.byzantine_ranks, self.byzantine_mode = _check_byzantine(byzantine_ranks, byzantine_mode)
        self.generator = generator
        self._ws = Workspace()
        self._state = {}
        self._layouts = {}
        self._exchanges = 0

    def use_baseline_codec(self) -> "PowerSGD":
        """The per-tensor form on every device (what the benchmarks measure as before)."""
        self.grouped = False
        return self

    def state_dict(self) -> dict:
        return {**super().state_dict(), "exchanges": torch.tensor([float(self._exchanges)])}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        exchanges = state.pop("exchanges", None)
        super().load_state_dict(state)
        self._exchanges = int(exchanges.item()) if exchanges is not None else 0

    # -- layout -------------------------------------------------------------------------------
    def _layout(self, shapes: Sequence[torch.Size]) -> _Layout:
        key = tuple(tuple(s) for s in shapes)
        if key in self._layouts:
            return self._layouts[key]
        groups, vectors, vector_index, offset = {}, [], [], 0
        for i, shape in enumerate(key):
            numel = math.prod(shape)
            if len(shape) >= 2:
                n, m = shape[0], numel // shape[0]
                r = min(n, m, self.rank)
                if _should_compress(n, m, r, self.min_compression_rate)[0]:
                    groups.setdefault((n, m), []).append(((offset, n, m, r), i))
                    offset += numel
                    continue
            vectors.append((offset, numel))
            vector_index.append(i)
            offset += numel
        matrices = [entry for group in groups.values() for entry, _ in group]
        layout = _Layout(matrices, vectors, sum(n * r for _, n, _, r in matrices),
                         sum(m * r for _, _, m, r in matrices), sum(v for _, v in vectors), _groups(matrices),
                         [math.prod(shape) for shape in key], [i for group in groups.values() for _, i in group],
                         vector_index)
        self._layouts[key] = layout
        return layout

    def _factors(self, layout: _Layout, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """P memory (scratch) and Q memory (state: warm start, else seeded normal draws)."""
        p = self._ws.get("p", (layout.p_numel,), torch.float32, device)
        q = self._state.get("q")
        if q is None or q.numel() != layout.q_numel:
            q = self._state["q"] = torch.empty(layout.q_numel, dtype=torch.float32)
            gen = torch.Generator().manual_seed(int(np.random.RandomState(self.random_seed).randint(1_000_000_000)))
            start = 0
            for _, _, m, r in layout.matrices:
                q[start:start + m * r].copy_(torch.randn(m * r, generator=gen))
                start += m * r
        if q.device != torch.device(device):
            q = self._state["q"] = q.to(device)
        return p, q

    # -- exchange -----------------------------------------------------------------------------
    def all_reduce_flat_(self, flat: torch.Tensor, n: int, shapes: Optional[Sequence[torch.Size]] = None) -> CommStats:
        if shapes is None:
            raise ValueError("powersgd needs the gradients' shapes (all_reduce_ passes them)")
        world, rank = _world()
        stats = CommStats()
        x = flat[:n]
        if rank in self.byzantine_ranks:
            corrupt_(x, self.byzantine_mode, self.generator)
        done, self._exchanges = self._exchanges, self._exchanges + 1  # a Python int: no host read per step
        if done < self.start_iter:  # plain fp32 mean, no error feedback yet (the hook's vanilla phase)
            self._all_reduce(stats, x, world)
            x.div_(world)
            return stats
        layout = self._layout(shapes)
        err = self._buffer("error", n, x)
        x.add_(err)
        before = self._ws.get("before", (n,), torch.float32, x.device).copy_(x)
        p_mem, q_mem = self._factors(layout, x.device)

        if self.grouped or (self.grouped is None and x.is_cuda):
            self._exchange_grouped(stats, world, layout, x, p_mem, q_mem)
        else:
            self._exchange_per_tensor(stats, world, layout, x, p_mem, q_mem)
        torch.sub(before, x, out=err)
        return stats

    def _exchange_grouped(self, stats: CommStats, world: int, layout: _Layout, x, p_mem, q_mem) -> None:
        """The vectors in one buffer and one all-reduce; the matrices stacked by shape (one copy in,
        one out), each group's products batched and orthogonalized in one call: a few kernels per
        shape instead of several per tensor."""
        parts = x.split(layout.sizes)
        if layout.vector_index:
            vectors = [parts[i] for i in layout.vector_index]
            vec = self._ws.get("vectors", (layout.v_numel,), torch.float32, x.device)
            torch.cat(vectors, out=vec)
            self._all_reduce(stats, vec, world)
            vec.div_(world)
            torch._foreach_copy_(vectors, vec.split(layout.vector_sizes))
        if not layout.groups:
            return
        matrices = [parts[i] for i in layout.matrix_index]
        stacked = self._ws.get("matrices", (layout.m_numel,), torch.float32, x.device)
        torch.cat(matrices, out=stacked)
        views = [(stacked[g.m_at:g.m_at + g.count * g.rows * g.cols].view(g.count, g.rows, g.cols),
                  p_mem[g.p_at:g.p_at + g.count * g.rows * g.rank].view(g.count, g.rows, g.rank),
                  q_mem[g.q_at:g.q_at + g.count * g.cols * g.rank].view(g.count, g.cols, g.rank))
                 for g in layout.groups]
        self._power_step(stats, world, views, p_mem, q_mem)
        torch._foreach_copy_(matrices, stacked.split(layout.matrix_sizes))

    def _exchange_per_tensor(self, stats: CommStats, world: int, layout: _Layout, x, p_mem, q_mem) -> None:
        """Copies, products and orthogonalizations one tensor at a time, in place in the flat buffer
        (the first form, and the CPU's); the same numbers and bytes as the grouped form."""
        vec = self._ws.get("vectors", (layout.v_numel,), torch.float32, x.device)
        start = 0
        for offset, numel in layout.vectors:
            vec[start:start + numel].copy_(x[offset:offset + numel])
            start += numel
        self._all_reduce(stats, vec, world)
        vec.div_(world)
        start = 0
        for offset, numel in layout.vectors:
            x[offset:offset + numel].copy_(vec[start:start + numel])
            start += numel
        self._power_step(stats, world, self._views(layout, x, p_mem, q_mem), p_mem, q_mem)

    def _power_step(self, stats: CommStats, world: int, views, p_mem, q_mem) -> None:
        """One power iteration on batches of (M, P, Q): P = M Q summed over ranks, Q = M^T P
        averaged, M <- P Q^T."""
        for matrix, p, q in views:
            _orthogonalize(q, EPSILON)
            torch.bmm(matrix, q, out=p)
        self._all_reduce(stats, p_mem, world)
        for matrix, p, q in views:
            _orthogonalize(p, EPSILON)
            torch.bmm(matrix.transpose(1, 2), p, out=q)
        self._all_reduce(stats, q_mem, world)
        q_mem.div_(world)
        for matrix, p, q in views:
            torch.bmm(p, q.transpose(1, 2), out=matrix)

    @staticmethod
    def _views(layout: _Layout, x, p_mem, q_mem):
        views, p_at, q_at = [], 0, 0
        for offset, n, m, r in layout.matrices:
            views.append((x[offset:offset + n * m].view(1, n, m), p_mem[p_at:p_at + n * r].view(1, n, r),
                          q_mem[q_at:q_at + m * r].view(1, m, r)))
            p_at += n * r
            q_at += m * r
        return views

    @staticmethod
    def _all_reduce(stats: CommStats, buf: torch.Tensor, world: int) -> None:
        if world == 1 or buf.numel() == 0:
            return
        _timed(stats, buf.device, tdist.all_reduce, buf)
        stats.bytes_sent += int(2 * (world - 1) * buf.numel() * buf.element_size() / world)

    # -- single tensor: one rank's factors, as a receiver would rebuild them ------------------
    def encode(self, tensor: torch.Tensor) -> Payload:
        """The fp32 factors P, Q of ``tensor`` (or the tensor itself, if not worth compressing)."""
        flat = tensor.detach().float().reshape(-1).clone()
        shape = tensor.shape
        layout = self._layout([shape])
        if not layout.matrices:
            return Payload(flat.view(torch.uint8), shape, tensor.dtype)
        _, n, m, r = layout.matrices[0]
        q = torch.randn(1, m, r, generator=torch.Generator().manual_seed(self.random_seed))
        _orthogonalize(q, EPSILON)
        p = torch.bmm(flat.view(1, n, m), q)
        _orthogonalize(p, EPSILON)
        q = torch.bmm(flat.view(1, n, m).transpose(1, 2), p)
        return Payload(torch.cat([p.reshape(-1), q.reshape(-1)]).view(torch.uint8), shape, tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        values = payload.data.view(torch.float32)
        layout = self._layout([payload.shape])
        if not layout.matrices:
            return values.view(payload.shape).to(payload.dtype)
        _, n, m, r = layout.matrices[0]
        p, q = values[:n * r].view(n, r), values[n * r:].view(m, r)
        return (p @ q.T).view(payload.shape).to(payload.dtype)
