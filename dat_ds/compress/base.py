"""What every compressor is: the registry, the abstract base, payloads, and the shared machinery
of the compressed methods (padding, topologies, Byzantine ranks, state)."""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..registry import Registry
from .byzantine import _check_byzantine, corrupt_
from .collectives import TOPOLOGIES, CommStats, _all_gather, _all_to_all, _world
from .settings import _check_choice
from .workspace import Workspace

COMPRESSORS = Registry("compressor")


@dataclass
class Payload:
    """One tensor as it goes on the wire: ``data`` (uint8) is all that is sent; ``shape`` and
    ``dtype`` are known to every rank (same model) and only tell ``decode`` what to rebuild."""
    data: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the pieces of ``flat`` back into ``tensors`` (same order and sizes)."""
    views = torch.split(flat, [t.numel() for t in tensors])
    torch._foreach_copy_(list(tensors), [v.view_as(t) for v, t in zip(views, tensors)])


def flatten_into(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``tensors`` into the leading pieces of ``flat`` (casting to its dtype), no temporaries."""
    views = torch.split(flat[:sum(t.numel() for t in tensors)], [t.numel() for t in tensors])
    torch._foreach_copy_([v.view_as(t) for v, t in zip(views, tensors)], list(tensors))


def _round_up(n: int, unit: int) -> int:
    return max(1, math.ceil(n / unit)) * unit


class Compressor(abc.ABC):
    """Base: ``encode``/``decode`` one tensor, and average gradients over ranks in place.

    A compressor averages either a list of gradients (``all_reduce_``) or one flat fp32 buffer
    (``all_reduce_flat_``, what ``compress.flat`` uses so that nothing is copied per step). The
    factory's signature declares its settings (``COMPRESSORS.settings(name)``), each with a type
    and a default; ``internal_settings`` are passed by code only, never by a user.
    """

    name = "base"
    internal_settings: Tuple[str, ...] = ("generator",)
    state_names: Tuple[str, ...] = ()
    # state that belongs to this rank's share of the exchange (a shard it serves): it restarts at
    # zero when a run resumes on another number of ranks, where the shares are cut differently
    shard_state: Tuple[str, ...] = ()
    _relayout = False  # True after load_merged_state: buffers may come from another world's layout

    @abc.abstractmethod
    def encode(self, tensor: torch.Tensor):
        """What this rank would send for ``tensor``."""

    @abc.abstractmethod
    def decode(self, payload) -> torch.Tensor:
        """The tensor a receiver rebuilds from ``payload``."""

    @abc.abstractmethod
    def all_reduce_flat_(self, flat: torch.Tensor, n: int, shapes: Optional[Sequence[torch.Size]] = None) -> CommStats:
        """Average ``flat[:n]`` (fp32, contiguous) over ranks in place. ``flat`` holds at least
        ``padded_numel(n, world)`` values, the ones after ``n`` free scratch. ``shapes``: the
        gradients' shapes in order (their numels sum to ``n``), for compressors that need them."""

    def padded_numel(self, n: int, world: int) -> int:
        """Room ``all_reduce_flat_`` needs for ``n`` gradient values on ``world`` ranks."""
        return n

    def all_reduce_(self, grads: List[torch.Tensor]) -> CommStats:
        """Average ``grads`` over ranks in place (any float dtype; exchanged as fp32)."""
        if not grads:
            return CommStats()
        world, _ = _world()
        n = sum(g.numel() for g in grads)
        flat = self._workspace().get("flat", (self.padded_numel(n, world),), torch.float32, grads[0].device)
        flatten_into(grads, flat)
        stats = self.all_reduce_flat_(flat, n, [g.shape for g in grads])
        unflatten_into(flat[:n], grads)
        return stats

    def _workspace(self) -> Workspace:
        ws = getattr(self, "_ws", None)
        if ws is None:
            ws = self._ws = Workspace()
        return ws

    # -- state: named fp32 buffers, plus the generator's state when there is one ----------------
    def _state_buffers(self) -> Dict[str, torch.Tensor]:
        state = getattr(self, "_state", None)
        if state is None:
            state = self._state = {}
        return state

    def state_dict(self) -> dict:
        """Tensors only (loadable with ``torch.load(weights_only=True)``)."""
        state = {k: v.detach().clone() for k, v in self._state_buffers().items()}
        generator = getattr(self, "generator", None)
        if generator is not None:
            state["generator"] = generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.state_names) - {"generator"})
        if unknown:
            raise ValueError(f"{self.name}: unexpected state {', '.join(unknown)}; "
                             f"it keeps: {', '.join(self.state_names + ('generator',))}")
        generator = getattr(self, "generator", None)
        if "generator" in state and generator is not None:
            generator.set_state(state["generator"])
        self._state = {k: torch.as_tensor(v).detach().clone().float() for k, v in state.items() if k != "generator"}

    @classmethod
    def merge_states(cls, states: Sequence[dict]) -> dict:
        """The state every rank of a new world starts from, given each old rank's (a run resumed on
        another number of ranks). Each rank's floating-point state (error-feedback residuals,
        momentum) enters the exchange's average, so every new rank takes the old ranks' mean: the
        average the exchange sees is preserved. State that is the same on every rank (PowerSGD's
        projection, counters) is unchanged by the mean. A generator's stream is not copied: each
        new rank keeps the stream it was created with, so no two ranks draw the same numbers.
        ``shard_state`` restarts at zero. Buffers sized for the old world's padding are cut or
        zero-padded to this world's when first used (:meth:`load_merged_state`)."""
        merged = {}
        for key in states[0]:
            if key == "generator" or key in cls.shard_state:
                continue
            values = [torch.as_tensor(s[key]) for s in states]
            merged[key] = torch.stack(values).mean(0) if values[0].is_floating_point() else values[0]
        return merged

    def load_merged_state(self, state: dict) -> None:
        """Load :meth:`merge_states`'s result: buffers laid out for another world size (padding) are
        cut or zero-padded to this exchange's size when first used (the values that matter, one per
        gradient entry, come first in every layout)."""
        self.load_state_dict(state)
        self._relayout = True

    def _buffer(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """The state buffer ``name`` (fp32, zeros at first), checked against this exchange's size."""
        state = self._state_buffers()
        buf = state.get(name)
        if buf is not None and buf.numel() != numel and self._relayout:
            fitted = torch.zeros(numel, dtype=torch.float32, device=like.device)
            keep = min(numel, buf.numel())
            fitted[:keep] = buf.reshape(-1)[:keep].to(like.device)
            buf = state[name] = fitted
        if buf is None:
            buf = state[name] = torch.zeros(numel, dtype=torch.float32, device=like.device)
        elif buf.numel() != numel:
            raise ValueError(f"{self.name}: the {name} buffer holds {buf.numel()} values but this exchange "
                             f"needs {numel}; use one compressor per gradient layout and world size")
        elif buf.device != like.device:
            buf = state[name] = buf.to(like.device)
        return buf


class _Compressed(Compressor):
    """Shared machinery of the compressed methods: padding, topologies, Byzantine ranks.

    A subclass supplies the codec (``_encode``/``_decode`` on aligned rows, ``unit`` = the
    alignment, ``_bits``/``_header`` for trimming single-tensor payloads), the worker step
    (``_worker``: state such as error feedback or momentum), the aggregation of the N
    contributions to a shard (``_reduce``) and the server step (``_serve``/``_unserve``).
    ``use_baseline_codec()`` switches to the first eager kernels (``baseline.py``), which the
    benchmark measures as "before".
    """

    unit = 8
    baseline = False

    def __init__(self, topology: str, byzantine_ranks: Sequence[int], byzantine_mode: str,
                 generator: Optional[torch.Generator]):
        self.topology = _check_choice("topology", topology, TOPOLOGIES)
        self.byzantine_ranks, self.byzantine_mode = _check_byzantine(byzantine_ranks, byzantine_mode)
        self.generator = generator
        self._ws = Workspace()
        self._state: Dict[str, torch.Tensor] = {}

    def use_baseline_codec(self) -> "_Compressed":
        self.baseline = True
        return self

    # -- single tensor ------------------------------------------------------------------------
    def encode(self, tensor: torch.Tensor) -> Payload:
        """What this rank would send for ``tensor`` (worker state and Byzantine role included)."""
        n = tensor.numel()
        size = _round_up(n, self.unit)
        flat = self._ws.get("single.flat", (1, size), torch.float32, tensor.device)
        flat[0, :n].copy_(tensor.detach().reshape(-1))
        flat[0, n:].zero_()
        if _world()[1] in self.byzantine_ranks:
            corrupt_(flat[0, :n], self.byzantine_mode, self.generator)
        data = self._worker(flat, n, self._ws, "single")   # scratch reused; the payload is cloned
        keep = self._header(size) + math.ceil(n * self._bits / 8)   # drop the padding's code bytes
        return Payload(data[0, :keep].clone(), tensor.shape, tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        n = math.prod(payload.shape)
        size = _round_up(n, self.unit)
        data = self._ws.get("single.data", (1, self._header(size) + size * self._bits // 8), torch.uint8,
                            payload.data.device)
        data[0, :payload.nbytes].copy_(payload.data)
        data[0, payload.nbytes:].zero_()
        return self._decode(data, size, self._ws, None)[0, :n].view(payload.shape).to(payload.dtype)

    # -- collective ---------------------------------------------------------------------------
    def padded_numel(self, n: int, world: int) -> int:
        return _round_up(n, world * self.unit)

    def all_reduce_flat_(self, flat: torch.Tensor, n: int, shapes: Optional[Sequence[torch.Size]] = None) -> CommStats:
        """Average ``flat[:n]`` over ranks in place through the compressor; see the package doc."""
        stats = CommStats()
        world, rank = _world()
        flat = flat[:self.padded_numel(n, world)]
        flat[n:].zero_()
        if rank in self.byzantine_ranks:
            corrupt_(flat[:n], self.byzantine_mode, self.generator)
        if self.topology == "one-sided":
            result = self._one_sided(flat, n, world, stats)
        else:
            result = self._two_sided(flat, n, world, rank, stats)
        if result.data_ptr() != flat.data_ptr():
            flat[:n].copy_(result[:n])
        return stats

    def _one_sided(self, flat: torch.Tensor, n: int, world: int, stats: CommStats) -> torch.Tensor:
        size = flat.numel()
        send = self._worker(flat.view(1, size), n, self._ws, "send")
        recv = _all_gather(stats, self._ws.get("recv", (world, send.shape[1]), torch.uint8, flat.device), send)
        return self._reduce(recv, size, out=flat).view(-1)

    def _two_sided(self, flat: torch.Tensor, n: int, world: int, rank: int, stats: CommStats) -> torch.Tensor:
        size = flat.numel() // world
        send = self._worker(flat.view(world, size), n, self._ws, "send")
        recv = _all_to_all(stats, self._ws.get("recv", send.shape, torch.uint8, flat.device), send)
        agg = self._reduce(recv, size)
        valid = min(max(n - rank * size, 0), size)     # data values in the shard this rank serves
        agg[valid:].zero_()                            # padding decodes to noise; keep it out of norms
        served = self._serve(agg.view(1, size), valid, world)
        gathered = _all_gather(stats, self._ws.get("gathered", (world, served.shape[1]), torch.uint8,
                                                   flat.device), served)
        return self._unserve(gathered, size, world, out=flat.view(world, size)).view(-1)

    def _mean(self, data: torch.Tensor, size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode the N payload rows into their average: one pass over all of them (the
        baseline decodes them one by one, in rank order)."""
        acc = self._ws.get("acc", (size,), torch.float32, data.device) if out is None else out.view(-1)
        if self.baseline:
            for r in range(data.shape[0]):
                self._decode(data[r:r + 1], size, self._ws, acc.view(1, size), weight=1 / data.shape[0],
                             accumulate=r > 0)
            return acc
        return self._decode(data, size, self._ws, acc, weight=1 / data.shape[0], mean=True)

    def _out(self, tag: str, rows: int, size: int, device) -> torch.Tensor:
        return self._ws.get(tag, (rows, size), torch.float32, device)

    def _decode(self, data, size, ws, out=None, weight=1.0, accumulate=False, mean=False):
        raise NotImplementedError

    def _unserve(self, data, size, world, out=None):
        """The served shards (N payload rows) decoded into (N, size) values."""
        return self._decode(data, size, self._ws, self._out("result", data.shape[0], size, data.device)
                            if out is None else out)


def create(name: str, **kwargs) -> Compressor:
    """Build a registered compressor, e.g. ``create("qsgd", bits=4, topology="two-sided")``."""
    return COMPRESSORS.create(name, **kwargs)


def names():
    return COMPRESSORS.names()
