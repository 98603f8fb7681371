"""Gradient communication: the one place where ranks exchange gradients.

DeepSpeed's own backward all-reduce is switched off (``engine.enable_backward_allreduce =
False``); after ``engine.backward`` a compressor averages the gradients in place, and every
compressor counts the bytes it sends. ``none`` is the fp32 all-reduce every compressor is
measured against.

    >>> c = create("qsgd", bits=4, bucket_size=512, topology="two-sided")
    >>> stats = c.all_reduce_([p.grad for p in model.parameters()])  # doctest: +SKIP

Compressors (``names()``), each with the paper it follows:

* ``none``: fp32 ring all-reduce of one flat buffer, the reference.
* ``qsgd``: QSGD (Alistarh, Grubic, Li, Tomioka and Vojnovic, "QSGD: Communication-Efficient
  SGD via Gradient Quantization and Encoding", NeurIPS 2017) with ``bits`` (1..8, or 16) per
  coordinate and one fp32 norm per bucket of ``bucket_size`` values. Unbiased stochastic
  rounding; codes are bit-packed (16 bits: one little-endian int16 signed level per value).
* ``sign_vote``: signSGD / Signum with majority vote (Bernstein, Wang, Azizzadenesheli and
  Anandkumar, "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018; Bernstein,
  Zhao, Azizzadenesheli and Anandkumar, "signSGD with Majority Vote is Communication Efficient
  and Fault Tolerant", ICLR 2019), 1 bit per coordinate. The result is the vote itself, +1 / -1
  per coordinate (0 where the vote is tied, possible only with an even number of ranks): the
  optimizer's learning rate sets the step size. An exact zero votes +1 or -1 by a fair coin
  (1 bit cannot carry 0; its sign bit would always say +1).
* ``ef_sign``: scaled sign with worker and server error feedback (Karimireddy, Rebjock, Stich
  and Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019),
  the compressor of DeepSpeed's former 1-bit Adam (Tang et al., "1-bit Adam: Communication
  Efficient Large-Scale Training with Adam's Convergence Speed", ICML 2021) and 1-bit LAMB (Li
  et al., "1-bit LAMB: Communication Efficient Large-Scale Large-Batch Training with LAMB's
  Convergence Speed", HiPC 2022).
* ``powersgd``: PowerSGD (Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient
  Compression for Distributed Optimization", NeurIPS 2019), rank-``matrix_rank`` factors P, Q
  of every matrix gradient, error feedback and warm start; vectors go as fp32 (DDP's PowerSGD
  hook).
* ``bf16``: cast to bfloat16, all-reduce, cast back and divide (DDP's ``bf16_compress_hook``).

Aggregation (``topology``), over ``N`` ranks:

* ``one-sided``: ``all_gather`` of every rank's compressed gradient; every rank decodes all
  ``N`` payloads (its own included, from the gathered bytes) and averages (or votes) locally.
* ``two-sided`` (parameter server, every rank serves a 1/N shard, the pattern of Zhang et al.,
  "Distributed Adversarial Training to Robustify Deep Neural Networks at Scale", UAI 2022):
  ``all_to_all`` of the compressed shards; each rank decodes and averages (or votes) its shard,
  re-compresses the result and ``all_gather``-s it; every rank decodes the same gathered bytes.

Either way every rank ends with bit-identical gradients: all of them decode the same bytes in
the same order. The flat gradient is zero-padded so that it splits into ``N`` equal shards of
whole buckets (and whole bytes of codes).

Byte accounting (``CommStats.bytes_sent``): the bytes this rank puts on the wire with a
bandwidth-optimal algorithm. A ring all-reduce of ``B`` bytes sends ``2 (N - 1) / N * B`` from
every rank (``none``); an ``all_gather`` of a ``P``-byte payload sends it to ``N - 1`` ranks,
``(N - 1) P``; an ``all_to_all`` of ``N`` shard payloads of ``P`` bytes sends ``(N - 1) P`` (a
rank keeps its own shard). Hence one-sided costs ``(N - 1)`` compressed gradients per rank and
two-sided about ``2 (N - 1) / N`` of one. World size 1 sends 0 bytes, but the compressed
methods still apply their compression round trip, so one process sees the same math.
``CommStats.comm_seconds`` is the wall time spent inside collectives (the device is
synchronized around them), so ``elapsed - comm_seconds`` is the encode/decode cost.

Byzantine ranks (experiments only): a rank listed in ``byzantine_ranks`` runs the honest
algorithm on a corrupted gradient: ``flip`` sends ``-g`` (flipped signs), ``random`` sends
Gaussian noise with the norm of ``g`` (random signs), ``scale`` sends ``-100 g`` (garbage that
dominates a mean; for the sign methods the same as ``flip``).

State (``state_dict()``, tensors only, so it loads with ``torch.load(weights_only=True)``):
``ef_sign`` keeps ``worker_error`` (the padded flat gradient) and ``server_error`` (the
shard this rank serves, two-sided only); ``sign_vote`` with momentum keeps ``momentum``;
``powersgd`` keeps ``error`` and the warm-start factors ``q``; any compressor given a
``generator`` keeps its state. One compressor instance serves one gradient layout and world
size. On the CPU a compressor also keeps scratch buffers (``Workspace``) so that the hot path
allocates little.

Package map: ``base`` (registry, abstract ``Compressor``, the compressed methods' shared
machinery), ``bits`` (bit packing), ``kernels`` (fused encode/decode, compiled for large
inputs; ``DAT_DS_COMPILE=0`` runs them eagerly, with identical bytes), ``qsgd_codec`` and
``sign_codec`` (the codecs), ``baseline`` (their first eager form, the benchmark's "before"),
``collectives``, ``byzantine``, ``settings``, ``flat`` (one persistent flat gradient buffer
and ``exchange(engine, compressor)``), and one module per compressor. A module dropped into
this package that registers a compressor is found without editing this file.
"""
from __future__ import annotations
from __future__ import annotations

import importlib
import pkgutil

from .base import (COMPRESSORS, Compressor, Payload, _Compressed, _round_up, create, flatten, flatten_into,  # noqa: F401
                   names, unflatten_into)
from .bits import header_floats, pack_bits, unpack_bits, unpack_to_float  # noqa: F401
from .byzantine import BYZANTINE_MODES, BYZANTINE_SCALE, _check_byzantine, corrupt_  # noqa: F401
from .collectives import TOPOLOGIES, CommStats, _all_gather, _all_to_all, _timed, _world  # noqa: F401
from .qsgd_codec import _qsgd_levels, qsgd_bytes, qsgd_decode, qsgd_encode  # noqa: F401
from .settings import _check_choice, _check_int  # noqa: F401
from .sign_codec import ef_encode, majority_vote, sign_bytes, sign_decode, sign_encode  # noqa: F401
from .workspace import Workspace, _empty  # noqa: F401


def _import_all() -> None:
    """Import every module of the package: each compressor registers itself on import."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_all()

from .bf16 import BF16Compression  # noqa: E402,F401
from .ef_sign import ErrorFeedbackSign  # noqa: E402,F401
from .flat import FlatGrads, exchange  # noqa: E402,F401
from .none import NoCompression  # noqa: E402,F401
from .powersgd import PowerSGD  # noqa: E402,F401
from .qsgd import QSGD  # noqa: E402,F401
from .sign_vote import SignVote  # noqa: E402,F401
